"""Named MoE model shapes (numbers from the models' published configs) and the bytes one routed
expert occupies, for planning budgets and predicting step times without loading a model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The expert-relevant shape of an MoE model.

    num_layers counts all decoder layers, num_moe_layers those with routed experts (DeepSeek
    keeps its first layers dense). An expert is a SwiGLU MLP: w13 [2 * I, H] and w2 [H, I].
    weight_bytes is per weight element (2 for bf16, 1 for fp8); fp8 block scales add under
    0.1% and are left out.
    """

    name: str
    num_layers: int
    num_moe_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    moe_intermediate_size: int
    num_shared_experts: int
    weight_bytes: int

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_moe_layers", "num_experts", "top_k", "hidden_size",
                      "moe_intermediate_size", "weight_bytes"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be >= 1, got {getattr(self, field)}")
        if self.num_moe_layers > self.num_layers or self.top_k > self.num_experts:
            raise ValueError(
                f"{self.name}: need num_moe_layers <= num_layers and top_k <= num_experts, got "
                f"{self.num_moe_layers}/{self.num_layers} and {self.top_k}/{self.num_experts}"
            )
        if self.num_shared_experts < 0:
            raise ValueError(f"{self.name}: num_shared_experts must be >= 0")

    @property
    def bytes_per_expert(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size * self.weight_bytes

    @classmethod
    def from_name(cls, name: str) -> ModelShape:
        key = name.strip().lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
        return PRESETS[key]


PRESETS: dict[str, ModelShape] = {
    shape.name: shape
    for shape in (
        ModelShape("mixtral-8x7b", 32, 32, 8, 2, 4096, 14336, 0, 2),
        ModelShape("qwen3-30b-a3b", 48, 48, 128, 8, 2048, 768, 0, 2),
        ModelShape("deepseek-v2-lite", 27, 26, 64, 6, 2048, 1408, 2, 2),
        ModelShape("deepseek-v3", 61, 58, 256, 8, 7168, 2048, 1, 1),
    )
}
