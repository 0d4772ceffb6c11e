"""Runs onnxruntime-genai's model builder with the Hugging Face config in the form the builder reads.

Transformers 5 describes Gemma 3's rotary embeddings per layer type (`rope_parameters =
{"full_attention": {...}, "sliding_attention": {...}}`); the builder's Gemma 3 path reads the older
flat form (`rope_parameters["rope_type"]`, `rope_theta` for the global layers, `rope_local_base_freq`
for the sliding-window ones) and stops with `KeyError: 'rope_type'`. This module takes the same
arguments as `python -m onnxruntime_genai.models.builder` and flattens the config between loading
it and building the graph; every other config goes through unchanged. An architecture the builder
does not know ends the process with one line naming it.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from typing import Any

# The layer types whose rotary bases the builder's Gemma 3 path takes: the global layers' base is
# `rope_theta`, the sliding-window layers' is `rope_local_base_freq` (layer_types says which is which).
GLOBAL_LAYERS = "full_attention"
LOCAL_LAYERS = "sliding_attention"


def flatten_layer_rope(config: Any) -> bool:
    """Rewrites a per-layer-type `rope_parameters` into the flat form; True when it did.

    Only plain rotary embeddings (`rope_type` "default") are flattened: the builder would apply a
    scaled rope (linear, yarn, ...) to both layer types, which is exact for neither.
    """
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_type" in params:
        return False
    if set(params) != {GLOBAL_LAYERS, LOCAL_LAYERS}:
        raise ValueError(
            f"rope_parameters per layer type must be {GLOBAL_LAYERS} and {LOCAL_LAYERS}: {params}"
        )
    kinds = {name: p.get("rope_type", "default") for name, p in params.items()}
    if set(kinds.values()) != {"default"}:
        raise ValueError(f"only plain rotary embeddings per layer type can be exported exactly: {kinds}")
    global_theta = float(params[GLOBAL_LAYERS]["rope_theta"])
    config.rope_parameters = {"rope_type": "default", "rope_theta": global_theta}
    config.rope_theta = global_theta
    config.rope_local_base_freq = float(params[LOCAL_LAYERS]["rope_theta"])
    return True


def main() -> None:
    from onnxruntime_genai.models import builder

    args = builder.get_args()
    # The builder's positional arguments, the same for reading its options and for building.
    model = [
        args.model_name,
        args.input,
        args.output,
        args.precision,
        args.execution_provider,
        args.cache_dir,
    ]
    extra_options = builder.parse_extra_options(
        *model,
        args.extra_options,
        builder_config_version=args.builder_config_version,
        target_options=args.target_options,
        drafter_options=args.drafter_options,
        speculative_options=args.speculative_options,
        runtime_config=args.runtime_config,
        search=args.search,
    )
    hf_config = extra_options["hf_details"]["hf_config"]
    if flatten_layer_rope(hf_config):
        print("flywheel: rope_parameters per layer type flattened for the builder")
    try:
        builder.create_model(*model, **extra_options)
    except NotImplementedError:
        # The builder names the folder, not what it lacks; this last line is the error shown.
        architecture = ", ".join(getattr(hf_config, "architectures", None) or ["(none in config.json)"])
        sys.exit(
            f"architecture {architecture} is not supported by onnxruntime-genai "
            f"{version('onnxruntime-genai')}'s model builder (Llama, Mistral, Qwen2/3, Phi3, Gemma 1-3 "
            "and a few others are)"
        )


if __name__ == "__main__":
    main()
