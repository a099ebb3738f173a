"""`l2t model compose`: model folders that `model.name_or_path` can point at."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli.common import console, fail

app = typer.Typer(help="Build model folders that `model.name_or_path` can point at.", no_args_is_help=True)


@app.command("compose")
def model_compose(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write (model, tokenizer with <image>, LlavaProcessor).")],
    language_model: Annotated[str, typer.Option(help="Causal LM: hub id or folder, e.g. Qwen/Qwen2-0.5B.")],
    vision_tower: Annotated[
        str, typer.Option(help="CLIP or SigLIP model: hub id or folder, e.g. google/siglip-so400m-patch14-384.")
    ],
    vision_feature_layer: Annotated[
        int, typer.Option(help="Hidden layer of the tower whose features go to the connector.")
    ] = -2,
    seed: Annotated[int, typer.Option(help="Seed of the fresh connector's weights.")] = 0,
) -> None:
    """TinyLLaVA-style composition: a pretrained LM and vision tower joined by a fresh connector,
    saved as a LlavaForConditionalGeneration folder (then pre-train the connector with
    model.freeze=connector_only and fine-tune with vision_tower)."""
    from workloads.model import compose_llava

    try:
        out = compose_llava(out_dir, language_model, vision_tower, vision_feature_layer=vision_feature_layer, seed=seed)
    except (OSError, ValueError) as error:
        fail(str(error))
    console.print(f"[green]wrote[/green] {out}")
