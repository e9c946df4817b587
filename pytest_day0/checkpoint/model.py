"""What an inspection of a checkpoint yields: plain data, so the PTQ gate can decide without I/O."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pytest_day0.checkpoint.recipes import Precision


class TensorInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    dtype: str  # safetensors dtype string: BF16, F8_E4M3, U8, I32, F32 ...
    shape: tuple[int, ...]
    nbytes: int
    shard: str  # file name relative to the checkpoint directory


class LinearLayer(BaseModel):
    """One linear module (``model.layers.0.mlp.down_proj``) and the precision its tensors say it has."""

    model_config = ConfigDict(frozen=True)

    module: str
    precision: Precision
    weight_dtype: str
    scale_tensors: tuple[str, ...] = ()  # weight_scale, weight_scale_2, input_scale, pre_quant_scale ...
    declared_precision: Precision | None = None  # what the quant config says this module should be
    declaration_mismatch: bool = False  # tensors and declaration disagree


class CheckpointMetadata(BaseModel):
    """What must not change between source and quantized output."""

    model_config = ConfigDict(frozen=True)

    architectures: tuple[str, ...] = ()
    model_type: str | None = None
    max_position_embeddings: int | None = None
    vocab_size: int | None = None
    chat_template_sha256: str | None = None
    tokenizer_sha256: str | None = None  # tokenizer.json (or tokenizer.model) content hash
    special_tokens: dict[str, str] = Field(default_factory=dict)  # bos/eos/pad/unk -> token text
    generation_config: dict[str, object] = Field(default_factory=dict)


class CheckpointInspection(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    total_bytes: int  # sum of tensor data bytes across shards (headers excluded)
    file_bytes: int  # sum of safetensors file sizes
    shards: tuple[str, ...]
    tensor_count: int
    quant_format: str | None  # "modelopt" | "compressed-tensors" | None (unquantized)
    quant_algo: str | None  # FP8, NVFP4, W4A16_AWQ, ... as the quant config names it
    quant_config: dict[str, object] = Field(default_factory=dict)  # raw hf_quant_config / quantization_config
    linear_layers: tuple[LinearLayer, ...]
    metadata: CheckpointMetadata
    header_reads: int = 0  # reads made against the shards (proves header-only, <= 2 per shard)

    def precision_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.linear_layers:
            counts[layer.precision.value] = counts.get(layer.precision.value, 0) + 1
        return counts
