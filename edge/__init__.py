"""factedge.edge: quantized multimodal chat through llama.cpp. Never imports torch."""

from factedge.edge.errors import FactedgeError

__all__ = ["FactedgeError"]
