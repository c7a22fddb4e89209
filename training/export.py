"""Export a checkpoint's weights to one safetensors file plus its config, for inference without DeepSpeed.

    python -m training.export --run-dir runs/x [--tag step_00000100] [--out runs/x/export]
    model = load_exported("runs/x/export")          # a PartiModel at TP=1, in eval mode

Whatever layout the run trained at (TP, PP, ZeRO), the checkpoint's tensors are read back whole
(megatron-core dist_checkpointing reshards to TP=1) under PartiModel's parameter names; the file holds
fp32 weights, and config.json the model section of the run's resolved config.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from training.checkpoint import checkpoint_dir, latest_tag, local_shape, sharded
from training.config import ModelConfig, config_from_dict


def read_weights(run_dir: str | Path, tag: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The full fp32 weights of a checkpoint by PartiModel name, and the run's config (as a dict)."""
    from megatron.core import dist_checkpointing

    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    init_parallel(tp=1, pp=1)
    path = checkpoint_dir(run_dir) / tag
    config = json.loads((path / "trainer_state.json").read_text())["config"]
    model_cfg = config_from_dict({"model": config["model"]}).model
    with torch.device("meta"):
        shapes = {n: local_shape(p) for n, p in PartiModel(model_cfg, meta=True).named_parameters()}
    template = {"model": {n: sharded(f"model.{n}", torch.empty(shape), torch.nn.Parameter(torch.empty(0)))
                          for n, shape in shapes.items()}}
    loaded = dist_checkpointing.load(template, str(path))
    return loaded["model"], config


def export(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None) -> Path:
    from safetensors.torch import save_file

    tag = tag or latest_tag(run_dir)
    if tag is None:
        raise FileNotFoundError(f"{checkpoint_dir(run_dir)} holds no complete checkpoint")
    weights, config = read_weights(run_dir, tag)
    out = Path(out or Path(run_dir) / "export")
    out.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in weights.items()}, str(out / "model.safetensors"),
              metadata={"checkpoint": tag})
    (out / "config.json").write_text(json.dumps({"model": config["model"], "checkpoint": tag}, indent=1))
    return out


def load_exported(path: str | Path, device: str = "cpu"):
    """A PartiModel (TP=1, eval mode) with the exported weights; needs a process group (one process is fine)."""
    from safetensors.torch import load_file

    from model_parallel.model import PartiModel
    from model_parallel.state import init_parallel

    path = Path(path)
    model_cfg: ModelConfig = config_from_dict({"model": json.loads((path / "config.json").read_text())["model"]}).model
    init_parallel(tp=1, pp=1)
    model = PartiModel(model_cfg)
    missing, unexpected = model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise KeyError(f"{path / 'model.safetensors'}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--tag", help="checkpoint tag (default: latest)")
    parser.add_argument("--out", help="output folder (default: RUN_DIR/export)")
    args = parser.parse_args(argv)
    print(f"exported to {export(args.run_dir, args.tag, args.out)}")


if __name__ == "__main__":
    main()
