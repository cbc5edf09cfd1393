"""hivemind-volunteer: lend a GPU or CPU to a decentralized Mixture-of-Experts training run."""

__version__ = "0.1.0"
