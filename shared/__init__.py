"""Shared by server, clients and tools: config, data, model, records, metrics, checkpoints.

Importing it silences three known library warnings, each by its exact message (every other warning
shows): they fire on every model build or DP step and say nothing a user can act on.
"""

import warnings

# transformers 5 calls its own deprecated property while building a model
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
# Opacus's per-sample hooks on layers whose inputs need no gradient (the frozen prefix feeds the LoRA layers)
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to")
# Opacus's RDP accountant when the best order is at the edge of its range: the epsilon it reports is then an
# upper bound (never an understatement)
warnings.filterwarnings("ignore", message="Optimal order is the (largest|smallest) alpha")
