"""epd-serve: Encode-Prefill-Decode disaggregated serving of multimodal models."""

__version__ = "0.1.0"
