"""srd-hf: plant, measure and remove backdoors in image-captioning VLMs."""

__version__ = "0.1.0"


def __getattr__(name):
    # lazy: `from srd_hf import SRDMasker` without importing torch-heavy modules up front
    if name == "SRDMasker":
        from .masker import SRDMasker

        return SRDMasker
    if name == "SRDPolicy":
        from .rl.modeling_srd import SRDPolicy

        return SRDPolicy
    raise AttributeError(f"module 'srd_hf' has no attribute {name!r}")
