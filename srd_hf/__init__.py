"""srd-hf: plant, measure and remove backdoors in image-captioning VLMs."""

__version__ = "0.1.0"
