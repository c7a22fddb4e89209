"""`python -m demo`: the end-to-end demo (demo/run.py)."""
from demo.run import main

main()
