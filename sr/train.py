r"""Train Parti's super-resolution upsampler (WDSR) on LAION-style shards, then export it.

    python -m sr.train --config configs/sr/wdsr-x4.yaml --data 'laion/{00000..00099}.tar' \
        --val-data 'laion/00100.tar' --run-dir runs/sr [--set train.steps=1000 ...] [--resume auto]
    torchrun --nproc_per_node 8 -m sr.train ...                 # data parallel (DDP)

Pairs are made from the images themselves: a random high-resolution crop (train.crop) and its antialiased
bicubic downsampling by the model's scale; with train.tokenizer, as Parti: the whole image (train.resize = the
tokenizer's size x the scale) downsampled, encoded and decoded by that frozen tokenizer, then the pair cropped
at one random place (train.crop in high resolution). Images smaller than the high-resolution side are skipped,
not enlarged. Loss: L1 (+ LPIPS when train.perceptual > 0). Logged per step:
the loss and the PSNR of the upsampled crops against bicubic upsampling of the same inputs; every
train.eval_interval steps and at the end, on --val-data (up to 16 held-out images, whole, resized and
centre-cropped to train.resize, or train.crop when 0): the PSNR of the
model and of bicubic upsampling, and compare_XXXXXXXX.png (rows: bicubic, model, original). The run directory
receives config.yaml, metrics.jsonl + TensorBoard, checkpoints/ (common/state_file.py: `--resume auto`
continues from `latest`, or from the newest complete checkpoint; `--resume none` is refused where there are
checkpoints) and, at the end, export.pt
(sr.model.load_upsampler). `--set train.init_from=<export.pt>` starts from an export's weights instead of fresh ones.
SIGUSR1/SIGTERM or a run_dir/STOP file: finish the step, save, write run_dir/REQUEUE, exit 75 (0 under torchrun;
common/preemption.py); `TRAINER=sr.train sbatch slurm/train.sbatch CONFIG RUN_DIR --data ...` requeues on it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from common.checkpoints import check_steps_left, checkpoint_dir, resume_tag
from common.cli import config_parser, run_trainer
from common.collection import StepCollection
from common.config import ConfigError, check_minima, save_config
from common.metrics import MetricsLogger, StepClock, mean_over_ranks, psnr
from common.preemption import StopRequest
from common.state_file import RESUME_ADVICE, STATE_FILE, check_fits, load_state, save_state
from data_pipeline.image_stream import CropStream, center_crops, gather_stream_states, restore_stream
from model_parallel.state import DeviceError, init_distributed, use_device
from sr.config import SRConfig
from sr.model import build_wdsr, load_upsampler, save_upsampler, upsample
from vq.config import IMAGE_TRAIN_MINIMA
from vq.losses import check_lpips_backbone, make_lpips
from vq.tokenizer import load_image_tokenizer


def downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The low-resolution input of a pair: antialiased bicubic downsampling (images in [-1, 1])."""
    return F.interpolate(images, scale_factor=1 / scale, mode="bicubic", antialias=True).clamp(-1, 1)


def bicubic(images: torch.Tensor, scale: int) -> torch.Tensor:
    """The baseline the upsampler must beat: bicubic upsampling, clamped to [-1, 1]."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic").clamp(-1, 1)


def lr_factor(step: int, steps: int) -> float:
    """The learning rate of `step` over train.lr: halved at 50% and at 75% of train.steps (WDSR's step decay).
    Computed from the step, not kept in a scheduler: a run extended to more steps, or resumed with another
    train.lr, follows the new schedule (a saved MultiStepLR kept the old milestones). In runs of fewer than 4 steps
    the milestones stay apart and after the first step (1 step: the full rate; 2: [1, 0.5])."""
    half = max(1, steps // 2)
    return 0.5 ** sum(step >= m for m in (half, max(half + 1, steps * 3 // 4)))


class SRTrainer:
    stop: StopRequest | None = None
    """The stop handlers common.cli.run_trainer installed before the build and the resume (else run() installs them)."""

    def __init__(self, cfg: SRConfig, data: str, run_dir: str | Path, val_data: str | None = None,
                 device: str | None = None):
        device = device or use_device(cfg.train.device, "train.device")  # (before init_distributed touches CUDA)
        t = cfg.train
        self.scale = cfg.model.resolved()["scale"]
        weights = ((w, 0, "a loss weight: a negative one maximises its term") for w in ("l1", "perceptual"))
        check_minima(t, "train", (*IMAGE_TRAIN_MINIMA, ("crop", self.scale, "the high-resolution crops' side"),
                                  *weights))  # (before the process group: its timeout is one of them)
        init_distributed(t.dist_timeout_minutes)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_lpips_backbone(t.perceptual, t.lpips_backbone)
        if t.batch_size % self.world:
            raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the world size {self.world}")
        if t.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision={t.precision!r} must be fp32 or bf16")
        for name in ("crop", "resize"):
            if getattr(t, name) % self.scale:
                raise ConfigError(f"train.{name}={getattr(t, name)} must be divisible by the model's scale "
                                  f"{self.scale}")
        if t.resize and t.resize < t.crop:
            raise ConfigError(f"train.resize={t.resize} must be at least train.crop={t.crop} (the crops are cut from "
                              "the resized images; 0: no resize)")
        self.cfg, self.run_dir, self.val_data = cfg, Path(run_dir), val_data
        self.device = device
        self.tokenizer = self.load_tokenizer(t) if t.tokenizer else None
        torch.manual_seed(t.seed)
        self.model = build_wdsr(cfg.model).to(self.device)
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model) if self.world > 1 else self.model
        self.opt = torch.optim.Adam(self.model.parameters(), lr=t.lr)
        self.lpips = make_lpips(t.lpips_backbone).to(self.device) if t.perceptual > 0 else None
        self.step = 0
        side = t.resize or t.crop  # the high-resolution images: never enlarged to it (see SRTrainConfig.resize)
        whole = side if self.tokenizer is not None else t.crop  # (a tokenizer reconstructs whole images)
        # The held-out images, read now on every rank: a --val-data without an image of `side` px fails here,
        # not at rank 0's first evaluation hours in (the other ranks would wait for it in a collective).
        try:
            self.val_images = center_crops(val_data, side, 16, min_size=side) if val_data else None
        except ValueError as e:
            raise ConfigError(f"--val-data {val_data}: {e}") from None
        # (the run folder is made once the inputs are known good: a refused one leaves none behind)
        self.log = MetricsLogger(self.run_dir, enabled=self.rank == 0)
        self.stream = CropStream(data, whole, t.resize, self.rank, self.world, t.seed, t.data_workers, min_size=side)

    def load_tokenizer(self, t):
        """train.tokenizer, frozen on this device; ConfigError unless train.resize is its image size x the scale
        and train.crop fits in it."""
        try:
            tokenizer = load_image_tokenizer(t.tokenizer, self.device)
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"train.tokenizer: {e}") from None  # (its message names the file)
        side = tokenizer.image_size * self.scale
        if t.resize != side or t.crop > side:
            raise ConfigError(f"train.tokenizer={t.tokenizer} reconstructs {tokenizer.image_size}px images: "
                              f"train.resize must be {side} (x the model's scale {self.scale}) and train.crop at most "
                              f"that; got train.resize={t.resize}, train.crop={t.crop}")
        return tokenizer

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> None:
        """Rank 0 writes checkpoints/step_XXXXXXXX/state.pt (common/state_file.py); every rank waits for it."""
        streams = gather_stream_states(self.stream)
        if self.rank == 0:
            state = {"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                     "step": self.step, "rng": torch.get_rng_state(),
                     "streams": streams, "config": dataclasses.asdict(self.cfg), "tokenizer": self.tokenizer_hash()}
            save_state(self.run_dir, self.step, state, self.cfg.train.retention())
        dist.barrier()

    def tokenizer_hash(self) -> str | None:
        """What the inputs depend on: the weights hash of train.tokenizer (vq/tokenizer.py), None without one."""
        return self.tokenizer.weights_hash if self.tokenizer is not None else None

    def resume(self) -> None:
        """Continue from `latest`, or from the newest complete checkpoint when `latest` is gone (logged)."""
        tag, note = resume_tag(self.run_dir, STATE_FILE)
        if note:
            self.log.info(note)
        if tag is None:
            self.start_fresh()
            return
        path = checkpoint_dir(self.run_dir) / tag / STATE_FILE
        state = load_state(path, ("model", "opt", "step", "rng"), writer="sr.train")
        check_steps_left(self.cfg.train.steps, state["step"], path)
        if "tokenizer" in state and state["tokenizer"] != self.tokenizer_hash():  # (checkpoints since 2026-12-05)
            then = (f"the reconstructions of a tokenizer of weights hash {state['tokenizer'][:12]}"
                    if state["tokenizer"] else "downsampled images (no train.tokenizer)")
            raise ConfigError(f"cannot resume {path}: its inputs were {then}, "
                              f"train.tokenizer={self.cfg.train.tokenizer or '(none)'} makes other inputs; give the "
                              "run's tokenizer or use a new --run-dir (nothing was changed)")
        check_fits(self.model, state["model"], f"{path} (to resume)", advice=RESUME_ADVICE)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])  # (an old checkpoint's "schedule" is not needed: lr_factor)
        self.step = state["step"]
        torch.set_rng_state(state["rng"])
        how = restore_stream(self.stream, state.get("streams"), self.step * self.cfg.train.batch_size // self.world,
                             path)
        self.log.info(f"resumed from {path} at step {self.step}; {how}")

    def start_fresh(self) -> None:
        """Step 0: the weights of train.init_from when it is set (an export of the same model section)."""
        path = self.cfg.train.init_from
        if not path:
            return
        state = load_upsampler(path, where=f"train.init_from={path}").state_dict()
        check_fits(self.model, state, f"train.init_from={path}")  # (every WDSR setting shows in the shapes)
        self.model.load_state_dict(state)
        self.log.info(f"weights from the upsampler export {path}")

    # -- the loop ------------------------------------------------------------------------------------
    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (low-resolution inputs, high-resolution targets) of the next step."""
        n = self.cfg.train.batch_size // self.world
        hr = torch.stack([next(self.stream) for _ in range(n)]).to(self.device).float() / 127.5 - 1
        return self.crop_pairs(self.low_resolution(hr), hr)

    def low_resolution(self, hr: torch.Tensor) -> torch.Tensor:
        """The inputs for high-resolution images in [-1, 1]: downsampled, and through the tokenizer if there is one."""
        lr = downsample(hr, self.scale)
        if self.tokenizer is None:
            return lr
        with torch.no_grad():
            return self.tokenizer.decode(self.tokenizer.encode(lr)).float().clamp(-1, 1)

    def crop_pairs(self, lr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole images' pairs (with a tokenizer) cropped to train.crop at one random place each, drawn from
        (seed, step, rank): a resumed run crops as the uninterrupted one. Without one the stream cropped already."""
        t, s = self.cfg.train, self.scale
        if hr.shape[-1] == t.crop:
            return lr, hr
        g = torch.Generator().manual_seed(t.seed * 1_000_003 + self.step * self.world + self.rank)
        c = t.crop // s
        corners = torch.randint(0, lr.shape[-1] - c + 1, (len(hr), 2), generator=g).tolist()
        return (torch.stack([x[:, y:y + c, z:z + c] for x, (y, z) in zip(lr, corners)]),
                torch.stack([x[:, y * s:(y + c) * s, z * s:(z + c) * s] for x, (y, z) in zip(hr, corners)]))

    def train_step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict:
        t = self.cfg.train
        rate = t.lr * lr_factor(self.step, t.steps)
        for group in self.opt.param_groups:
            group["lr"] = rate
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=t.precision == "bf16" and self.device == "cuda"):
            out = self.ddp(lr).float()
        l1 = F.l1_loss(out, hr)
        loss = t.l1 * l1 + (t.perceptual * self.lpips(out, hr).mean() if self.lpips is not None else 0)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        out = out.detach().clamp(-1, 1)
        return {"loss": loss.item(), "l1": l1.item(), "lr": rate, "psnr": psnr(out, hr),
                "psnr_bicubic": psnr(bicubic(lr, self.scale), hr)}

    def evaluate(self) -> dict:
        """PSNR of the model and of bicubic upsampling on the held-out images, and a comparison grid."""
        from torchvision.utils import save_image

        hr = self.val_images.to(self.device).float() / 127.5 - 1
        lr = self.low_resolution(hr)
        self.model.eval()
        out = upsample(self.model, lr)
        self.model.train()
        base = bicubic(lr, self.scale)
        grid = self.run_dir / f"compare_{self.step:08d}.png"
        save_image(torch.cat([base[:8], out[:8], hr[:8]]) * 0.5 + 0.5, grid, nrow=min(8, len(hr)))
        return {"valid_psnr": psnr(out, hr), "valid_psnr_bicubic": psnr(base, hr), "grid": str(grid)}

    def run(self) -> list[dict]:
        """Step until train.steps, then export; return this call's per-step logs. A requested stop (SIGUSR1,
        SIGTERM, run_dir/STOP: common/preemption.py) saves after the step in flight and raises Preempted."""
        t, history = self.cfg.train, []
        if self.rank == 0:  # (here, after resume()'s checks: a refused config or checkpoint leaves the run's)
            save_config(self.cfg, self.run_dir / "config.yaml")
        # (run_trainer installs the stop handlers before the build and the resume: self.stop; else here)
        stop = self.stop or StopRequest(self.run_dir / "STOP", t.exit_after_minutes)
        collection = StepCollection(t.gc_interval)
        self.log.resumed_at(self.step)  # (steps after it that a killed segment logged are trained again)
        self.model.train()
        try:
            stop.start(self.run_dir, self.step, t.steps)
            clock = StepClock()  # (images/s over the log interval's steps, saves and evaluation left out)
            while self.step < t.steps:
                with clock.waiting():
                    batch = self.batch()
                logs = mean_over_ranks(self.train_step(*batch))
                self.step += 1
                history.append(logs)
                collection.step_done(self.step)
                clock.step_done()
                if self.step % t.log_interval == 0 or self.step == t.steps:
                    self.log.step({"step": self.step, **logs, **clock.rates(t.batch_size, "images")})
                if self.rank == 0 and self.val_data and (self.step % t.eval_interval == 0 or self.step == t.steps):
                    with clock.paused():
                        result = self.evaluate()
                    self.log.step({"step": self.step, **{k: v for k, v in result.items() if k != "grid"}})
                    self.log.info(f"held-out PSNR {result['valid_psnr']:.2f} dB, bicubic "
                                  f"{result['valid_psnr_bicubic']:.2f} dB; {result['grid']}")
                    history[-1].update(result)
                preempted = stop.requested()
                if preempted or self.step % t.save_interval == 0 or self.step == t.steps:
                    with clock.paused():
                        self.save()
                if preempted:
                    stop.leave_for_requeue(self.run_dir, self.step, last=self.step == t.steps)
        finally:  # the decoding processes, also when a step fails
            collection.close()
            stop.restore()
            self.stream.close()
            self.log.close()  # (also when stopped: TensorBoard's unflushed events and a W&B run are finished)
        if self.rank == 0:
            save_upsampler(self.model, self.cfg.model, self.run_dir / "export.pt")
            self.log.info(f"exported {self.run_dir / 'export.pt'}")
        return history


def main(argv: list[str] | None = None) -> None:
    parser = config_parser(__doc__, where="configs/sr/", example="model.preset=x2 train.steps=1000")
    parser.add_argument("--data", required=True, help="LAION-style shard pattern (training images)")
    parser.add_argument("--val-data", default=None, help="shard pattern of held-out images for evaluation")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", default="auto", choices=["auto", "none"])
    args = parser.parse_args(argv)
    run_trainer(args, SRConfig, lambda cfg: SRTrainer(cfg, args.data, args.run_dir, args.val_data), "sr.train",
                use_device, DeviceError)


if __name__ == "__main__":
    main()
