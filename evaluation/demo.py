"""`python -m evaluation.demo`, the demo's former address: the demo now lives in demo/ (`python -m demo`).
Kept so that scripts written for the old command keep working; it runs the same main."""
from demo.run import main

if __name__ == "__main__":
    main()
