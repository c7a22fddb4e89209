"""Process groups, the Parti model from megatron-core TP layers, kernel selection, CPU compatibility."""
import warnings

# megatron-core warns at import that apex/TE are missing; kernels.select_kernels logs what is used instead.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
