"""megaswift: megatron-core native pre-training, fine-tuning and Hugging Face conversion."""

__version__ = "0.1.0"
