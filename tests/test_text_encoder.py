"""Text-encoder warm start (training/text_encoder.py): masked-token pre-training learns, gives the same losses at
TP=2 and DP=2, and stopped and resumed at another layout those of an uninterrupted run; a Parti run starts with
exactly the pre-trained weights at TP=1, TP=2 and PP=2; a frozen encoder never changes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import run

PRETRAIN = ["train.steps=40", "train.global_batch_size=16", "train.micro_batch_size=8", "train.lr=3e-3",
            "train.warmup_steps=2", "model.dropout=0.1"]  # (keyed by caption: the same masks at any layout)
HELD_OUT = ["train.eval_interval=20", "train.eval_batches=2"]  # (debug's synthetic data: generated held-out captions)


@pytest.fixture(scope="module")
def pretrained(single_process, tmp_path_factory):
    """A text encoder pre-trained at TP=1 on the debug run's captions; (losses, its folder, its weights)."""
    from training.config import load_config
    from training.text_encoder import OUTPUT, pretrain

    run_dir = tmp_path_factory.mktemp("textenc")
    losses = pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, *HELD_OUT]), run_dir)
    return losses, run_dir / OUTPUT, read_encoder(run_dir / OUTPUT)


def read_encoder(folder) -> dict:
    """The saved encoder's weights whole, read independently of load_text_encoder (dist_checkpointing at TP=1)."""
    from megatron.core import dist_checkpointing

    from training.config import load_config
    from training.text_encoder import MaskedTextEncoder, _blocks

    cfg = load_config("configs/train/debug.yaml", PRETRAIN)
    model = MaskedTextEncoder(cfg.model, init_seed=999)  # other weights, replaced by the file's
    loaded = dist_checkpointing.load(_blocks(model, cfg.model), str(folder))["model"]
    assert all(name.endswith("#0") for name in loaded)  # whole tensors at TP=1: one block each
    return {name.removesuffix("#0"): t.clone() for name, t in loaded.items()}


def held_out_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["valid_loss"] for m in metrics(run_dir) if "valid_loss" in m}


def test_masked_token_loss_falls(pretrained):
    """On the training captions and on held-out ones (train.eval_interval: measured at steps 20 and 40)."""
    losses = pretrained[0]
    assert len(losses) == 40 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    held_out = held_out_losses(pretrained[1].parent)
    assert list(held_out) == [20, 40] and held_out[40] < held_out[20] < losses[0], held_out


def test_the_masked_token_loss_takes_the_fused_cross_entropy_with_the_plain_ones_values(single_process):
    """MaskedTextEncoder's loss goes through kernels.cross_entropy, as the image-token loss does (a GPU's auto:
    fused): fused = plain (megatron-core's on fp32 logits) in loss and gradients, with fp32 and bf16 weights."""
    from model_parallel.kernels import availability, select_kernels
    from training.config import KernelConfig, load_config
    from training.text_encoder import MaskedTextEncoder, mask_tokens

    if availability()["cross_entropy"]["fused"]:
        pytest.skip(f"cross_entropy=fused: {availability()['cross_entropy']['fused']}")
    cfg = load_config("configs/train/debug.yaml", []).model
    g = torch.Generator().manual_seed(0)
    captions = torch.randint(4, cfg.text_vocab_size, (3, cfg.text_seq_len), generator=g)
    inputs, chosen = mask_tokens(captions, cfg, g)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        results = []
        for name in ("plain", "fused"):
            model = MaskedTextEncoder(cfg, select_kernels(KernelConfig(cross_entropy=name)), init_seed=5).to(dtype)
            assert model.cross_entropy.func is select_kernels(KernelConfig(cross_entropy=name)).cross_entropy
            torch.manual_seed(1)  # (the same dropout masks, if the debug model draws any, for both)
            loss = model(inputs, captions, chosen)
            loss.backward()
            results.append((loss.detach().float(), {n: p.grad.float() for n, p in model.named_parameters()}))
        (plain, plain_grads), (fused, fused_grads) = results
        torch.testing.assert_close(fused, plain, atol=tolerance, rtol=tolerance)
        for n, grad in plain_grads.items():
            torch.testing.assert_close(fused_grads[n], grad, atol=tolerance, rtol=tolerance, msg=n)


def test_masking_chooses_15_percent_of_the_words_and_masks_80_keeps_10_replaces_10():
    """BERT's rates (Devlin et al. 2019, 3.1), over the words only (ids before EOS, no padding): of a large batch,
    15% of the words chosen; of those, 80% become [MASK], 10% a random word, 10% stay."""
    from training.config import load_config
    from training.text_encoder import MASK_ID, mask_tokens

    cfg = load_config("configs/train/debug.yaml", []).model
    g = torch.Generator().manual_seed(0)
    length = 128  # (64 words: a caption left with none chosen, whose first word is then chosen, is rare)
    captions = torch.randint(4, cfg.text_vocab_size, (1000, length), generator=g)
    captions[:, length // 2] = cfg.text_eos_id  # words: the first half of each row
    captions[:, length // 2 + 1:] = cfg.text_pad_id
    inputs, chosen = mask_tokens(captions, cfg, g)
    words = torch.zeros_like(chosen)
    words[:, :length // 2] = True
    assert not (chosen & ~words).any()
    assert chosen.sum() / words.sum() == pytest.approx(0.15, abs=0.01)
    masked, kept = (inputs == MASK_ID) & chosen, (inputs == captions) & chosen
    shares = [int(x.sum()) / int(chosen.sum()) for x in (masked, kept, chosen & ~masked & ~kept)]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.02)  # (a random word may draw the same: ~0.1%)
    assert (inputs[chosen & ~masked & ~kept] >= 4).all()  # random words, never PAD/UNK/BOS(=[MASK])/EOS


def test_pretraining_asked_for_a_missing_gpu_stops_before_writing(single_process, tmp_path):
    """train.device=cuda (what the sbatch scripts set) without a usable GPU is an error naming why, as in
    training.train, not a silent run on the CPU."""
    from training.config import load_config
    from training.text_encoder import pretrain

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    with pytest.raises(RuntimeError, match="device cuda was asked for"):
        pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, "train.device=cuda"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def pretrain_at(run_dir: str, *overrides: str) -> list[float]:
    from training.config import load_config
    from training.text_encoder import pretrain

    return pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, *overrides]), run_dir)


@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.tp=1"], ids=["tp2", "dp2"])
def test_pretraining_at_tp2_and_dp2_gives_the_losses_of_one_process(pretrained, pool2, tmp_path, layout):
    """Training and held-out losses (each rank its share of the held-out captions at DP=2)."""
    losses = pool2.run(pretrain_at, str(tmp_path), layout, *HELD_OUT)
    assert losses[0] == losses[1]
    assert losses[0] == pytest.approx(pretrained[0], rel=1e-4, abs=1e-4)
    held_out = held_out_losses(tmp_path)
    assert held_out == pytest.approx(held_out_losses(pretrained[1].parent), rel=1e-4) and len(held_out) == 2
    weights = read_encoder(tmp_path / "text_encoder")  # saved from 2 ranks, read back whole
    for name, w in pretrained[2].items():
        # The key part of qkv's bias gets no gradient (softmax ignores it): Adam turns fp32 rounding noise,
        # which differs between layouts, into updates of ~1e-4 there. Elsewhere nearly all agree to ~1e-6;
        # an element whose gradient is near 0 can take a few such noisy updates (2.3e-5 seen). A wrong mask or
        # sample would move weights by ~lr = 3e-3 a step.
        tolerance = 1e-3 if name.endswith("qkv.bias") else 1e-4
        torch.testing.assert_close(weights[name], w, rtol=1e-4, atol=tolerance, msg=name)



def stopped_at_dp2_resumed_at_tp2(run_dir: str) -> list[float]:
    """Pre-training at DP=2 asked to stop (the STOP file, as slurm/train.sbatch does) during step 20, then run
    again at TP=2 to the end; the losses of all 40 steps."""
    import torch.distributed as dist

    from common.preemption import Preempted
    from training.text_encoder import _Pretraining

    real_step, first = _Pretraining.step, []

    def step_then_stop(self, step):
        if step == 19 and dist.get_rank() == 0:
            (Path(run_dir) / "STOP").touch()
        first.append(real_step(self, step)[0])
        return first[-1], 0.0

    _Pretraining.step = step_then_stop
    try:
        with pytest.raises(Preempted, match="after step 20; checkpoint saved"):
            pretrain_at(run_dir, "parallel.tp=1")
    finally:
        _Pretraining.step = real_step
    if dist.get_rank() == 0:  # (rank 0 wrote it before raising; the next segment's start removes it)
        assert (Path(run_dir) / "REQUEUE").read_text() == "step 20\n" and not (Path(run_dir) / "STOP").exists()
    return first + pretrain_at(run_dir, "parallel.tp=2")


def test_pretraining_stopped_resumes_at_another_layout_with_the_uninterrupted_losses(pretrained, pool2, tmp_path):
    """Weights and Adam's moments saved at the stop (no save was due), resharded from DP=2 to TP=2: the 40
    losses of one uninterrupted process."""
    losses = pool2.run(stopped_at_dp2_resumed_at_tp2, str(tmp_path))
    assert losses[0] == losses[1] and len(losses[0]) == 40
    assert losses[0] == pytest.approx(pretrained[0], rel=1e-4, abs=1e-4)
    assert not (tmp_path / "REQUEUE").exists() and not (tmp_path / "STOP").exists()
    assert (tmp_path / "checkpoints" / "step_00000020").is_dir()
    assert (tmp_path / "text_encoder" / "config.json").is_file()


def encoder_weights(run_dir: str, *overrides: str) -> dict:
    """Build a Parti run (no step) with the warm start, and return its text encoder's weights gathered whole."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from model_parallel.pipeline import canonical_parameters, is_text_encoder
    from training.config import load_config
    from training.trainer import Trainer

    cfg = load_config("configs/train/debug.yaml", ["train.global_batch_size=8", "train.micro_batch_size=2",
                                                   "model.dropout=0.0", *overrides])
    trainer = Trainer(cfg, run_dir)
    try:
        out, tp = {}, ps.get_tensor_model_parallel_world_size()
        for name, p in canonical_parameters(trainer.engine.module, cfg.model).items():
            if not is_text_encoder(name):
                continue
            w = p.detach().clone()
            if getattr(p, "tensor_model_parallel", False) and tp > 1:
                parts = [torch.empty_like(w) for _ in range(tp)]
                dist.all_gather(parts, w.contiguous(), group=ps.get_tensor_model_parallel_group())
                w = torch.cat(parts, dim=p.partition_dim)
            out[name] = w
        return out
    finally:
        trainer.close()


@pytest.mark.parametrize("layout", [(), ("parallel.tp=2",), ("parallel.pp=2",)], ids=["tp1", "tp2", "pp2"])
def test_warm_start_loads_the_pretrained_weights_at_any_layout(pretrained, pool2, tmp_path, layout):
    _, folder, weights = pretrained
    sets = [f"model.init_text_encoder={folder}", *layout]
    if layout:
        got = pool2.run(encoder_weights, str(tmp_path), *sets)
        got = {**got[1], **got[0]}  # (under PP=2 the encoder lives on stage 0 only)
    else:
        got = encoder_weights(str(tmp_path), *sets)
    assert set(got) == set(weights)
    for name, w in weights.items():
        torch.testing.assert_close(got[name], w, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("zero, pp, precision", [(0, 1, "fp32"), (1, 1, "fp32"), (1, 2, "bf16")])
def test_a_frozen_text_encoder_never_changes(pretrained, single_process, pool2, tmp_path, zero, pp, precision):
    """3 steps with model.freeze_text_encoder (one process at ZeRO-0; DP=2 at ZeRO-1, whose partitions hold
    the encoder's optimizer state too; PP=2 at ZeRO-1 in bf16, where only the first stage holds the encoder's
    parameter group): the checkpoint's encoder is the pre-trained one, bit for bit, while the decoder moved
    away from its initialisation. PP=2 at ZeRO-1 in fp32 is refused before anything is built (DeepSpeed's
    fp32 ZeRO reduces each group's norm across the stages: the stage without the encoder's group hung)."""
    from common.config import ConfigError
    from model_parallel.model import PartiModel
    from training.checkpoint import latest_tag
    from training.config import load_config
    from training.export import open_checkpoint, read_weights

    _, folder, weights = pretrained
    sets = [f"model.init_text_encoder={folder}", "model.freeze_text_encoder=true", f"parallel.zero_stage={zero}",
            f"parallel.pp={pp}", f"train.precision={precision}"]
    if pp > 1:
        with pytest.raises(ConfigError, match="needs train.precision=bf16 .* would wait on each other"):
            load_config("configs/train/debug.yaml", [*sets, "train.precision=fp32"]).validate()
    if zero:
        pool2.run(run, str(tmp_path), *sets, steps=3)
    else:
        run(str(tmp_path), *sets, steps=3)
    opened = open_checkpoint(tmp_path, latest_tag(tmp_path))
    trained, state = read_weights(opened), opened.state
    for name, w in weights.items():  # (bf16: DeepSpeed's fp32 master weights start from the bf16 model's)
        expected = w.to(torch.bfloat16).float() if precision == "bf16" else w
        torch.testing.assert_close(trained[name], expected, rtol=0, atol=0, msg=name)
    cfg = load_config("configs/train/debug.yaml", sets)
    initial = PartiModel(cfg.model, init_seed=state["config"]["train"]["seed"]).state_dict()
    assert not torch.equal(trained["decoder.0.mlp.fn.fc1.weight"], initial["decoder.0.mlp.fn.fc1.weight"])
    if not zero:
        # Step 1 (same weights, same batch) without freezing: the global norm there includes the encoder's
        # gradients, the frozen run's does not (it clips only what trains). Here the encoder's part is small
        # (~0.1 of ~2.76: 6e-4 of the norm); runs of the same norm agree to ~1e-7.
        run(str(tmp_path / "unfrozen"), *[s for s in sets if "freeze" not in s], steps=1)
        norms = [json.loads((d / "metrics.jsonl").read_text().splitlines()[0])["grad_norm"]
                 for d in (tmp_path, tmp_path / "unfrozen")]
        assert 0 < norms[0] < (1 - 1e-4) * norms[1], norms


def test_caption_lines_are_the_non_blank_lines_of_the_files(tmp_path):
    """--text-files captions, read by position and tokenized when read, are each file's non-blank lines in order
    (CRLF, no final newline, blank or whitespace-only lines, an empty file); a file that is not UTF-8 is named."""
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from training.config import ConfigError
    from training.captions import CaptionLines

    # (the last line, without a newline, is short enough to be read whole: not cut at its last character)
    texts = ["a red circle\r\n\n  two green cats  \n\t\n\u3000\nun café bleu\n", "", "last line but one\na dog"]
    for i, text in enumerate(texts):
        (tmp_path / f"{i}.txt").write_text(text, encoding="utf-8", newline="")
    tok = TextTokenizer(train_sentencepiece(["a red circle two green cats un café bleu a dog"] * 50, 40,
                                            tmp_path / "spm.model"), max_len=8)
    want = [torch.tensor(tok.encode(line.strip())[0]) for text in texts for line in text.split("\n") if line.strip()]
    captions = CaptionLines([str(tmp_path / f"{i}.txt") for i in range(3)], tok)
    assert len(captions) == len(want) == 5
    for i in reversed(range(5)):
        assert torch.equal(captions[i], want[i]), i
    (tmp_path / "bad.txt").write_bytes(b"fine\nnot \xff utf-8\n")
    with pytest.raises(ConfigError, match=r"bad\.txt: line 2 is not UTF-8"):
        CaptionLines([str(tmp_path / "0.txt"), str(tmp_path / "bad.txt")], tok)
    with pytest.raises(ConfigError, match=r"1\.txt: no captions"):
        CaptionLines([str(tmp_path / "1.txt")], tok)
    # Lines the tokenizer's normalisation empties (zero-width spaces: EOS-only rows, loss 0) are left out, counted;
    # punctuation alone is a caption. A file of those alone: no captions, as a folder or a missing file is refused.
    (tmp_path / "zw.txt").write_text("\u200b\n!!\na dog\n\u200b\u200b\n", encoding="utf-8")
    assert tok.encode("\u200b")[1] == 1 and tok.encode("!!")[1] > 1
    captions = CaptionLines([str(tmp_path / "zw.txt")], tok)
    assert len(captions) == 2 and captions.left_out == 2 and torch.equal(captions[1], want[4])
    (tmp_path / "zw.txt").write_text("\u200b\n" * 41, encoding="utf-8")
    for path, says in (("zw.txt", "no captions"), (".", "a folder"), ("none.txt", "no such file")):
        with pytest.raises(ConfigError, match=rf"--text-files {tmp_path / path}: {says}"):
            CaptionLines([str(tmp_path / path)], tok)


def test_a_planted_pickle_in_an_encoder_folder_does_not_run(pretrained, single_process, tmp_path):
    """model.init_text_encoder reads the folder's tensor index (.metadata, which torch.distributed.checkpoint
    unpickles) only after the safe check (training/checkpoint_verify.py): a payload there is refused unrun."""
    import pickle
    import shutil

    from common.checkpoints import CheckpointError
    from model_parallel.model import PartiModel
    from tests.test_resume_safety import Payload
    from training.config import load_config
    from training.text_encoder import load_text_encoder

    folder, marker = tmp_path / "encoder", tmp_path / "payload_ran"
    shutil.copytree(pretrained[1], folder)
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    cfg = load_config("configs/train/debug.yaml", [])
    with pytest.raises(CheckpointError, match=r"encoder/\.metadata: .*would import builtins\.exec .*refusing"):
        load_text_encoder(PartiModel(cfg.model), cfg.model, folder)
    assert not marker.exists()


def test_pretraining_on_text_files_and_a_mismatched_encoder_is_refused(pretrained, single_process, tmp_path):
    from common.checkpoints import CheckpointError
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from model_parallel.model import PartiModel
    from training.config import ConfigError, load_config
    from training.text_encoder import load_text_encoder, pretrain

    lines = ["a red circle on a white background", "two green cats", "a blue square on grass", "a photo of a dog"]
    (tmp_path / "captions.txt").write_text("\n".join(lines * 10) + "\n")
    spm = train_sentencepiece(lines * 50, 60, tmp_path / "spm.model")
    losses = pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, "train.steps=3"]), tmp_path / "files",
                      [str(tmp_path / "captions.txt")], str(spm))
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    saved = json.loads((tmp_path / "files" / "text_encoder" / "config.json").read_text())["text_tokenizer"]
    assert saved == {"hash": TextTokenizer(spm).content_hash, "vocab_size": TextTokenizer(spm).vocab_size}
    other_spm = train_sentencepiece([line.upper() for line in lines] * 50, 30, tmp_path / "other.model")  # (other ids)
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000003: its text encoder was trained on the ids of "
                                          r"another text tokenizer"):
        pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, "train.steps=4"]), tmp_path / "files",
                 [str(tmp_path / "captions.txt")], str(other_spm))
    model_cfg = load_config("configs/train/debug.yaml", []).model
    with pytest.raises(ConfigError, match=r"model.init_text_encoder=.*text_encoder: its text encoder was trained on "
                                          r"the ids of another text tokenizer "
                                          r"\(sha256 [0-9a-f]{12}\.\.\. there, 0+\.\.\."):
        load_text_encoder(PartiModel(model_cfg), model_cfg, tmp_path / "files" / "text_encoder", {"hash": "0" * 64})
    load_text_encoder(PartiModel(model_cfg), model_cfg, tmp_path / "files" / "text_encoder", saved)
    load_text_encoder(PartiModel(model_cfg), model_cfg, tmp_path / "files" / "text_encoder", None)  # (synthetic)
    files, held_out = [str(tmp_path / "captions.txt")], tmp_path / "held_out.txt"
    held_out.write_text("\n".join(["a yellow circle", "three red dogs"] * 2) + "\n")
    evaluated = load_config("configs/train/debug.yaml", [*PRETRAIN, "train.steps=2", "train.eval_interval=2",
                                                         "train.eval_batches=1"])
    with pytest.raises(ConfigError, match="train.eval_interval with --text-files needs --valid-text-files"):
        pretrain(evaluated, tmp_path / "eval", files, str(spm))
    with pytest.raises(ConfigError, match="--valid-text-files: 4 captions; .* need 16"):
        pretrain(evaluated, tmp_path / "eval", files, str(spm), valid_text_files=[str(held_out)])
    with pytest.raises(ConfigError, match="--valid-text-files needs train.eval_interval > 0"):
        pretrain(load_config("configs/train/debug.yaml", PRETRAIN), tmp_path / "eval", files, str(spm),
                 valid_text_files=[str(held_out)])
    assert not (tmp_path / "eval").exists()
    held_out.write_text(held_out.read_text() * 4)
    pretrain(evaluated, tmp_path / "eval", files, str(spm), valid_text_files=[str(held_out)])
    assert list(held_out_losses(tmp_path / "eval")) == [2]
    with pytest.raises(CheckpointError, match=r"step_00000003: an encoder of another shape \(model.hidden_size: 64 "
                                              r"there, 32 here"):  # a rerun there continues from its checkpoint
        pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, "model.hidden_size=32", "model.num_heads=2"]),
                 tmp_path / "files", [str(tmp_path / "captions.txt")], str(spm))
    (tmp_path / "parti" / "checkpoints" / "step_00000001").mkdir(parents=True)
    (tmp_path / "parti" / "checkpoints" / "step_00000001" / "trainer_state.json").write_text('{"step": 1}')
    (tmp_path / "parti" / "checkpoints" / "latest").write_text("step_00000001\n")
    with pytest.raises(CheckpointError, match="not a checkpoint of python -m training.text_encoder"):
        pretrain(load_config("configs/train/debug.yaml", PRETRAIN), tmp_path / "parti")
    with pytest.raises(CheckpointError, match="--resume none: .*parti/checkpoints holds checkpoints"):
        pretrain(load_config("configs/train/debug.yaml", PRETRAIN), tmp_path / "parti", resume="none")
    cfg = load_config("configs/train/debug.yaml", ["model.hidden_size=32", "model.num_heads=2"])  # another width
    with pytest.raises(ConfigError, match=r"another shape \(model.hidden_size: 64 there, 32 here"):
        load_text_encoder(PartiModel(cfg.model), cfg.model, pretrained[1])
    with pytest.raises(ConfigError, match="no config.json there"):
        load_text_encoder(PartiModel(cfg.model), cfg.model, tmp_path)
    with pytest.raises(ConfigError, match="model.init_text_encoder needs parallel.zero_stage < 3"):
        load_config("configs/train/debug.yaml", [f"model.init_text_encoder={pretrained[1]}",
                                                 "parallel.zero_stage=3"]).validate()
    with pytest.raises(ConfigError, match="decoder_only has no text encoder to pre-train"):
        pretrain(load_config("configs/train/debug.yaml", ["model.preset=dalle-debug"]), tmp_path / "dalle")
    with pytest.raises(ConfigError, match="model.init_text_encoder needs model.arch=encoder_decoder"):
        load_config("configs/train/debug.yaml", ["model.preset=dalle-debug",
                                                 f"model.init_text_encoder={pretrained[1]}"]).validate()


def test_code_shard_captions_keep_their_text_tokenizer_and_held_out_shards_of_another_are_refused(tmp_path,
                                                                                                  monkeypatch):
    """Captions read from code shards carry their manifest's text tokenizer (saved with the encoder, checked by
    a Parti run's warm start), and held-out shards made with another one are refused: their ids mean other
    words."""
    from common.config import ConfigError
    from data_pipeline import synthetic
    from training.captions import caption_source, caption_tokenizer, held_out_captions
    from training.config import load_config

    header = synthetic.RANDOM_SHARDS_HEADER
    synthetic.write_random_code_shards(tmp_path / "train", 2)
    monkeypatch.setattr(synthetic, "RANDOM_SHARDS_HEADER",
                        {**header, "text_tokenizer": {**header["text_tokenizer"], "hash": "another"}})
    synthetic.write_random_code_shards(tmp_path / "valid", 2)
    cfg = load_config("configs/train/debug.yaml", [
        "model.image_grid=2", "model.text_seq_len=4", "model.text_vocab_size=128", "model.image_vocab_size=64",
        "data.synthetic=false", f"data.shards={tmp_path / 'train'}", f"data.valid_shards={tmp_path / 'valid'}",
        "train.eval_batches=1", "train.global_batch_size=4", "train.micro_batch_size=2"])
    captions = caption_source(cfg, None, None)
    want = header["text_tokenizer"]
    assert caption_tokenizer(captions) == {"hash": want["hash"], "vocab_size": want["vocab_size"]}
    with pytest.raises(ConfigError, match=r"data\.valid_shards=.*: made with another text tokenizer"):
        held_out_captions(cfg, captions, None)


def test_a_warm_start_from_an_encoder_of_other_caption_ids_is_refused(single_process, tmp_path):
    """The Parti trainer checks the encoder's text tokenizer against its code shards' (manifest.json's
    text_tokenizer hash): an encoder pre-trained on other ids is refused, naming the folder; the same ids load."""
    from common.config import ConfigError
    from data_pipeline.synthetic import RANDOM_SHARDS_HEADER, write_random_code_shards
    from training.config import load_config
    from training.text_encoder import OUTPUT, pretrain
    from training.trainer import Trainer

    model = ["model.image_grid=2", "model.text_seq_len=4", "model.text_vocab_size=128", "model.image_vocab_size=64"]
    pretrain(load_config("configs/train/debug.yaml", [*PRETRAIN, *model, "train.steps=1"]), tmp_path / "enc")
    folder, config = tmp_path / "enc" / OUTPUT, json.loads((tmp_path / "enc" / OUTPUT / "config.json").read_text())
    assert config["text_tokenizer"] is None  # (synthetic captions: ids of no tokenizer)
    write_random_code_shards(tmp_path / "codes", 4)
    sets = [*model, "data.synthetic=false", f"data.shards={tmp_path / 'codes'}", f"model.init_text_encoder={folder}",
            "train.global_batch_size=4", "train.micro_batch_size=2"]
    (folder / "config.json").write_text(json.dumps({**config, "text_tokenizer": {"hash": "another"}}))
    with pytest.raises(ConfigError, match=f"model.init_text_encoder={folder}: its text encoder was trained on the "
                                          "ids of another text tokenizer"):
        Trainer(load_config("configs/train/debug.yaml", sets), tmp_path / "refused")
    (folder / "config.json").write_text(json.dumps({**config,
                                                    "text_tokenizer": RANDOM_SHARDS_HEADER["text_tokenizer"]}))
    Trainer(load_config("configs/train/debug.yaml", sets), tmp_path / "accepted").close()


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_pretraining_in_bf16_follows_fp32(pretrained, single_process, tmp_path, log_lines):
    """train.precision=bf16 is honoured (autocast: bf16 matmuls on fp32 weights, gradients and AdamW state), not
    silently run in fp32: its losses follow the fp32 run's closely without being theirs. Settings of a Parti run
    that this command does not apply are named in its log."""
    losses = pretrain_at(str(tmp_path), "train.precision=bf16", "parallel.zero_stage=1", "train.async_save=true")
    assert losses == pytest.approx(pretrained[0], rel=2e-2) and losses != pretrained[0]
    log = "\n".join(log_lines)
    assert "note: parallel.zero_stage=1 does not apply here" in log and "note: train.async_save does not" in log
    lines = metrics(tmp_path)
    assert lines[0]["lr"] == pytest.approx(3e-3 / 2)  # step 1's LR (warm-up 2 steps), not step 2's
    assert lines[-1]["skipped_steps"] == 0


def test_nonfinite_pretraining_steps_are_skipped_and_too_many_stop_the_run(single_process, tmp_path, monkeypatch):
    """A step with a non-finite loss is skipped (its gradients would make every weight NaN) and counted; the run
    goes on and learns. train.max_skipped_steps of them in a row stop it with the reason."""
    from training.text_encoder import MaskedTextEncoder

    real_forward, calls, poisoned = MaskedTextEncoder.forward, [], {2}  # (2 micro-batches a step: step 2's first)

    def forward(self, *args):
        calls.append(1)
        loss = real_forward(self, *args)
        return loss * float("nan") if len(calls) - 1 in poisoned else loss

    monkeypatch.setattr(MaskedTextEncoder, "forward", forward)
    losses = pretrain_at(str(tmp_path / "a"), "train.steps=8")
    assert losses[1] != losses[1] and all(x == x for x in losses[:1] + losses[2:]), losses
    assert losses[-1] < losses[0]
    assert [m["skipped_steps"] for m in metrics(tmp_path / "a")] == [0] + [1] * 7
    calls.clear()
    poisoned.update(range(2, 100))  # (steps 2, 3, 4)
    with pytest.raises(RuntimeError, match="stopping at step 4: the last 3 steps had non-finite loss"):
        pretrain_at(str(tmp_path / "b"), "train.steps=8", "train.max_skipped_steps=3")
    calls.clear()  # ... and across a resume: the count in a row is saved (2 at step 3)
    pretrain_at(str(tmp_path / "c"), "train.steps=3", "train.max_skipped_steps=3")
    with pytest.raises(RuntimeError, match="stopping at step 4: the last 3 steps had non-finite loss"):
        pretrain_at(str(tmp_path / "c"), "train.steps=8", "train.max_skipped_steps=3")


def test_pretraining_resumed_with_another_config_is_checked_first(single_process, tmp_path, log_lines):
    """A resume compares the configs as the Parti trainer does: what the masks depend on is refused before
    config.yaml is rewritten; schedule changes are reported as applied. Adafactor is refused (Adam's moments)."""
    from training.config import ConfigError

    pretrain_at(str(tmp_path), "train.steps=2")
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError, match=r"cannot resume .*step_00000002 with other caption ids: model.text_eos_id "
                                          r"3 -> 1"):
        pretrain_at(str(tmp_path), "train.steps=3", "model.text_eos_id=1")
    assert (tmp_path / "config.yaml").read_text() == saved
    with pytest.raises(ConfigError, match="train.optimizer=adafactor: the text encoder's pre-training trains with"):
        pretrain_at(str(tmp_path), "train.optimizer=adafactor")
    log_lines.clear()
    pretrain_at(str(tmp_path), "train.steps=3", "train.lr=1e-3", "model.decoder_layers=4")  # (not the encoder's)
    log = "\n".join(log_lines)
    assert "config changes applied from step 2 on: train.steps 2 -> 3, train.lr 0.003 -> 0.001" in log, log
    assert "config changes on resume: model.decoder_layers 2 -> 4" in log
    assert "lr: 0.001" in (tmp_path / "config.yaml").read_text() and "lr: 0.001" not in saved


def test_pretraining_resumed_after_a_skipped_step_gives_the_uninterrupted_losses(single_process, tmp_path,
                                                                               monkeypatch):
    """Adam's step count on resume is the steps less those skipped: it was the step, so after a skipped step the
    bias correction of every later update was off and the losses parted from the uninterrupted run's."""
    from training.text_encoder import MaskedTextEncoder

    real_forward, calls = MaskedTextEncoder.forward, []

    def forward(self, *args):  # (2 micro-batches a step: the 3rd call is step 2's first)
        calls.append(1)
        loss = real_forward(self, *args)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(MaskedTextEncoder, "forward", forward)
    whole = pretrain_at(str(tmp_path / "a"), "train.steps=6")
    calls.clear()
    resumed = pretrain_at(str(tmp_path / "b"), "train.steps=3")
    resumed += pretrain_at(str(tmp_path / "b"), "train.steps=6")
    assert whole[1] != whole[1] and resumed[1] != resumed[1]
    assert whole[2:] == resumed[2:]
    # The skipped step leaves the LR schedule where it is, as the Parti trainer's does: step 3 trains at step 2's
    # rate (in warm-up here), in the resumed run too.
    from common.schedule import lr_lambda
    from training.config import load_config

    t = load_config("configs/train/debug.yaml", [*PRETRAIN, "train.steps=6"]).train
    lrs = [m["lr"] for m in metrics(tmp_path / "a")]
    assert lrs == pytest.approx([t.lr * lr_lambda(t)(k) for k in (0, 1, 1, 2, 3, 4)], rel=1e-9)
    assert [m["lr"] for m in metrics(tmp_path / "b")] == lrs


def test_pretraining_resumed_with_another_batch_size_goes_on_where_it_stopped(single_process, tmp_path,
                                                                            monkeypatch):
    """The caption stream continues at the captions consumed (3 steps of 16), not at step x the new batch size
    (which skipped 48 captions)."""
    from training.text_encoder import _Pretraining

    real, firsts = _Pretraining._masked_batch, []

    def masked_batch(self, captions, sampler, first, seed):
        if captions is self.captions:
            firsts.append(first)
        return real(self, captions, sampler, first, seed)

    monkeypatch.setattr(_Pretraining, "_masked_batch", masked_batch)
    pretrain_at(str(tmp_path), "train.steps=3")
    pretrain_at(str(tmp_path), "train.steps=5", "train.global_batch_size=32")
    assert firsts == [0, 16, 32, 48, 80]


def test_a_rewrite_of_the_pretrained_encoder_cut_short_keeps_the_earlier_one(single_process, tmp_path,
                                                                           monkeypatch):
    """A rerun that extends a finished run rewrites text_encoder/; killed after its tensors were written but
    before config.json, the folder still holds the earlier encoder whole (it held the new tensors under the
    earlier config.json, a folder that looked complete)."""
    from training import checkpoint

    pretrain_at(str(tmp_path), "train.steps=2")
    before = read_encoder(tmp_path / "text_encoder")
    real_save = checkpoint.dist_checkpointing.save

    def save_then_die(state, folder, **kwargs):
        real_save(state, folder, **kwargs)
        if Path(folder).parent == tmp_path:  # (the encoder's write, not the checkpoint's before it)
            raise KeyboardInterrupt("killed before config.json")

    monkeypatch.setattr(checkpoint.dist_checkpointing, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        pretrain_at(str(tmp_path), "train.steps=3")
    after = read_encoder(tmp_path / "text_encoder")
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    monkeypatch.undo()
    pretrain_at(str(tmp_path), "train.steps=3")  # (the rerun replaces it, and its leftover)
    assert not torch.equal(read_encoder(tmp_path / "text_encoder")["text_embedding.embed.weight"],
                           before["text_embedding.embed.weight"])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("text_encoder")) == ["text_encoder"]


def test_a_text_tokenizer_that_is_not_sentencepiece_ends_in_one_line(single_process, tmp_path):
    """--text-tokenizer naming a file that is not a SentencePiece model: one line naming it (it was a traceback)."""
    from training.text_encoder import main

    (tmp_path / "captions.txt").write_text("a red circle\n")
    (tmp_path / "bad.model").write_text("not a model")
    with pytest.raises(SystemExit, match=r"bad\.model: not a SentencePiece model"):
        main(["--config", "configs/train/debug.yaml", "--run-dir", str(tmp_path / "run"), "--text-files",
              str(tmp_path / "captions.txt"), "--text-tokenizer", str(tmp_path / "bad.model")])


def test_the_held_out_loss_of_an_untrained_encoder_is_that_of_uniform_guesses(single_process, tmp_path):
    """The held-out loss is the mean over train.eval_batches global batches (not their sum): an encoder that has
    not learned (one step at a negligible rate, small initial weights) guesses each masked word uniformly over
    the vocabulary, ln(text_vocab_size) per token."""
    import math

    from training.config import load_config
    from training.text_encoder import pretrain

    cfg = load_config("configs/train/debug.yaml", [*PRETRAIN, "train.steps=1", "train.lr=1e-12", "train.min_lr=0",
                                                   "train.eval_interval=1", "train.eval_batches=3"])
    pretrain(cfg, tmp_path)
    assert held_out_losses(tmp_path)[1] == pytest.approx(math.log(cfg.model.text_vocab_size), rel=0.05)


def test_the_loss_is_the_mean_over_the_global_batchs_chosen_tokens_at_any_micro_batch(single_process, tmp_path):
    """Each micro-batch's loss was its own mean, averaged by rows: a caption among few chosen tokens weighed more,
    and the losses and updates changed with train.micro_batch_size (a resume at another layout changes it). Also:
    biases and norms take no weight decay (BERT's and the Parti trainer's groups), and caption ids the masking
    would confuse ([MASK] = BOS as EOS, a random word as PAD) are refused."""
    from training.captions import caption_source
    from training.config import ConfigError, load_config
    from training.text_encoder import _Pretraining

    losses = {mb: pretrain_at(str(tmp_path / str(mb)), "train.steps=3", f"train.micro_batch_size={mb}")
              for mb in (16, 4)}
    assert losses[4] == pytest.approx(losses[16], rel=1e-5)  # (measured before: 6.7297 vs 6.7233 at step 2)
    cfg = load_config("configs/train/debug.yaml", [*PRETRAIN, "train.weight_decay=0.1"])
    run = _Pretraining(cfg, tmp_path / "groups", "cpu", caption_source(cfg, None, None))
    decay = {p.ndim >= 2: group["weight_decay"] for group in run.optimizer.param_groups for p in group["params"]}
    assert decay == {True: 0.1, False: 0.0}
    run.log.close()
    for setting in ("model.text_eos_id=2", "model.text_pad_id=5"):
        with pytest.raises(ConfigError, match=rf"^{setting}: the masked-token pre-training keeps ids 0-3"):
            pretrain_at(str(tmp_path / "ids"), setting)


def test_a_blend_weighted_below_its_size_is_read_whole_over_the_epochs(single_process, tmp_path):
    """The captions of a data.shards blend are read as the Parti trainer reads them (by the stream position's
    epoch): a dataset weighted below its size gives other captions each epoch, all of them over two here (the
    pre-training read epoch 0's every epoch: the same half twice)."""
    from data_pipeline.code_shards import MixedDataset
    from data_pipeline.sampler import GlobalBatchSampler
    from training.captions import _Captions
    from training.config import load_config
    from training.text_encoder import _Pretraining

    cfg = load_config("configs/train/debug.yaml", PRETRAIN)
    m = cfg.model

    def caption(word: int) -> tuple[torch.Tensor, None]:
        ids = torch.full((m.text_seq_len,), m.text_pad_id)
        ids[0], ids[1] = word, m.text_eos_id
        return ids, None

    small, big = [caption(4 + k) for k in range(40)], [caption(44 + k) for k in range(40)]
    captions = _Captions(MixedDataset([small, big], [1, 3]))  # (small: 20 of each epoch's 80)
    run = _Pretraining(cfg, tmp_path, "cpu", captions)
    sampler = GlobalBatchSampler(len(captions), cfg.train.global_batch_size, cfg.train.seed)
    read = [int(w) for first in range(0, 2 * len(captions), cfg.train.global_batch_size)
            for w in run._masked_batch(captions, sampler, first, 0)[1][:, 0]]
    assert sorted(w for w in read if w < 44) == list(range(4, 44))
    run.log.close()


def test_the_update_of_a_clipped_step_has_the_size_the_clip_gives(single_process, tmp_path):
    """With gradients clipped to a global norm c far below Adam's eps, AdamW's first update is lr x g / eps per
    element (m = g, sqrt(v) = |g|; weight decay off), so the weights move by lr x c / eps in all: the clip's
    threshold, by hand (a clip ten times looser moved them ten times further; Adam hides any clip otherwise)."""
    from training.captions import caption_source
    from training.config import load_config
    from training.text_encoder import _Pretraining

    cfg = load_config("configs/train/debug.yaml", [*PRETRAIN, "train.grad_clip=1e-10", "train.weight_decay=0",
                                                   "model.dropout=0.0"])
    run = _Pretraining(cfg, tmp_path, "cpu", caption_source(cfg, None, None))
    run.resume()
    before = [p.detach().clone() for p in run.params]
    run.step(0)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(run.params, before)))
    t = cfg.train
    rate = t.lr * run.schedule.lr_lambdas[0](0)  # (the first step's: in warm-up)
    assert float(moved) == pytest.approx(rate * t.grad_clip / t.adam_eps, rel=1e-2)  # (fp32 rounding of the weights)
    run.log.close()


def test_a_data_parallel_ranks_masks_are_its_rows_of_the_whole_batchs_and_every_caption_has_a_chosen_word():
    """mask_tokens draws the whole global batch's masks and keeps a rank's rows (the masks do not depend on DP);
    a caption of few words with none drawn gets its first chosen; padding (even a row without EOS) never is."""
    from training.config import load_config
    from training.text_encoder import mask_tokens

    cfg = load_config("configs/train/debug.yaml", []).model
    captions = torch.full((64, cfg.text_seq_len), cfg.text_pad_id)
    captions[:, 0] = torch.randint(4, cfg.text_vocab_size, (64,), generator=torch.Generator().manual_seed(1))
    captions[:, 1] = cfg.text_eos_id  # one word each: ~85% of them drawn none
    captions[:, 2:4] = 7  # (after EOS: not words)
    captions[-1] = cfg.text_pad_id  # a row of padding alone
    whole = mask_tokens(captions, cfg, torch.Generator().manual_seed(3))
    for first, rows in ((0, 16), (16, 16), (48, 16)):
        part = mask_tokens(captions[first:first + rows], cfg, torch.Generator().manual_seed(3), first, len(captions))
        assert all(torch.equal(p, w[first:first + rows]) for p, w in zip(part, whole)), first
    inputs, chosen = whole
    assert chosen[:-1, 0].all() and not chosen[:, 1:].any() and not chosen[-1].any()
    assert torch.equal(inputs[:, 1:], captions[:, 1:])


def test_the_pretrained_encoder_is_partimodels_encoder_with_a_tied_head(single_process):
    """The loss is the cross-entropy at the chosen positions of PartiModel.encode's output (its padding mask
    included) against the token embedding: what a Parti run that loads the encoder computes with it."""
    from model_parallel.model import PartiModel
    from training.config import load_config
    from training.text_encoder import MaskedTextEncoder, mask_tokens

    cfg = load_config("configs/train/debug.yaml", []).model
    g = torch.Generator().manual_seed(0)
    captions = torch.randint(4, cfg.text_vocab_size, (4, cfg.text_seq_len), generator=g)
    for row, length in enumerate((2, 5, cfg.text_seq_len // 2, cfg.text_seq_len - 1)):
        captions[row, length], captions[row, length + 1:] = cfg.text_eos_id, cfg.text_pad_id
    inputs, chosen = mask_tokens(captions, cfg, g)
    encoder, parti = MaskedTextEncoder(cfg, init_seed=5), PartiModel(cfg, init_seed=5)
    with torch.no_grad():
        loss = encoder(inputs, captions, chosen)
        memory, _ = parti.encode(inputs)  # [T, b, d]
        logits = (memory @ parti.text_embedding.embed.weight.t()).transpose(0, 1)  # [b, T, V]
        want = torch.nn.functional.cross_entropy(logits[chosen].float(), captions[chosen], reduction="sum")
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-4)


def test_the_held_out_loss_is_measured_without_dropout_over_distinct_batches(single_process, tmp_path):
    """train.eval_batches global batches, each its own captions and masks, in eval mode (model.dropout gives the
    same held-out loss as none), the encoder left in training mode after."""
    from training.captions import caption_source, held_out_captions
    from training.config import load_config
    from training.text_encoder import _Pretraining

    measured = {}
    for dropout in (0.5, 0.0):
        cfg = load_config("configs/train/debug.yaml", [*PRETRAIN, f"model.dropout={dropout}",
                                                       "train.eval_interval=1", "train.eval_batches=3"])
        captions = caption_source(cfg, None, None)
        run = _Pretraining(cfg, tmp_path / str(dropout), "cpu", captions, held_out_captions(cfg, captions, None))
        run.resume()
        real, batches = run._masked_batch, []
        run._masked_batch = lambda c, s, first, seed: batches.append((first, seed)) or real(c, s, first, seed)
        (held_out,) = run.held_out.values()
        measured[dropout] = run.held_out_loss(held_out)
        assert run.model.training and [b[0] for b in batches] == [0, 16, 32] and len({b[1] for b in batches}) == 3
        run.log.close()
    assert measured[0.5] == pytest.approx(measured[0.0], rel=1e-6)


def test_the_held_out_loss_is_also_measured_at_the_last_step(single_process, tmp_path):
    """train.steps not a multiple of train.eval_interval: measured at each multiple and at the end."""
    pretrain_at(str(tmp_path), "train.steps=3", "train.eval_interval=2", "train.eval_batches=1")
    assert list(held_out_losses(tmp_path)) == [2, 3]


def test_settings_the_pretraining_cannot_run_with_are_refused_before_it_starts(single_process, tmp_path):
    """A PAD or EOS id among the random words' (from 4 on) or equal to [MASK]; a global batch that the micro-batches
    do not divide."""
    from training.config import ConfigError

    for setting in ("model.text_pad_id=4", "model.text_eos_id=4"):
        with pytest.raises(ConfigError, match=rf"^{setting}: the masked-token pre-training keeps ids 0-3"):
            pretrain_at(str(tmp_path / "ids"), setting)
    with pytest.raises(ConfigError, match="train.global_batch_size=16 must be divisible by train.micro_batch_size=5"):
        pretrain_at(str(tmp_path / "batch"), "train.micro_batch_size=5")


def test_a_run_whose_first_steps_were_all_skipped_saves_and_resumes(single_process, tmp_path, monkeypatch):
    """AdamW makes a parameter's state at its first update: a checkpoint written before any (every step so far
    skipped for non-finite gradients) gets zero moments, not a missing-state error."""
    from training.text_encoder import MaskedTextEncoder

    real_forward = MaskedTextEncoder.forward
    monkeypatch.setattr(MaskedTextEncoder, "forward", lambda self, *args: real_forward(self, *args) * float("nan"))
    losses = pretrain_at(str(tmp_path), "train.steps=1")
    assert losses[0] != losses[0] and (tmp_path / "checkpoints" / "step_00000001").is_dir()
    monkeypatch.undo()
    losses = pretrain_at(str(tmp_path), "train.steps=2")
    assert len(losses) == 1 and losses[0] == losses[0]
    assert [m["skipped_steps"] for m in metrics(tmp_path)] == [1, 1]


def test_a_checkpoint_without_sampler_order_or_consumed_samples_resumes_as_written(single_process, tmp_path,
                                                                                   monkeypatch):
    """A checkpoint of a run begun before the caption order and the samples consumed were recorded goes on in
    the stored permutation's order ("randperm") at step x its global batch size."""
    from training.text_encoder import _Pretraining

    pretrain_at(str(tmp_path), "train.steps=2")
    state_file = tmp_path / "checkpoints" / "step_00000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["sampler_order"], state["consumed_samples"]
    state_file.write_text(json.dumps(state))
    real, read = _Pretraining._masked_batch, []

    def masked_batch(self, captions, sampler, first, seed):
        read.append((first, sampler.order))
        return real(self, captions, sampler, first, seed)

    monkeypatch.setattr(_Pretraining, "_masked_batch", masked_batch)
    pretrain_at(str(tmp_path), "train.steps=3", "train.global_batch_size=32")
    assert read == [(32, "randperm")]


def test_the_settings_this_command_does_not_apply_are_named():
    from training.config import load_config
    from training.text_encoder import not_applied

    notes = not_applied(load_config("configs/train/debug.yaml", ["parallel.pp=2", "parallel.zero_stage=1",
                                                                 "parallel.activation_checkpointing=full",
                                                                 "train.async_save=true", "train.init_from=r/x",
                                                                 "train.rampup_batch_size=4 4 8",
                                                                 "train.ema_decay=0.9"]))
    assert [n.split(" does not apply")[0] for n in notes] == [
        "note: parallel.pp=2", "note: parallel.zero_stage=1", "note: parallel.activation_checkpointing=full",
        "note: train.async_save", "note: train.rampup_batch_size=4 4 8", "note: train.ema_decay=0.9",
        "note: train.init_from=r/x"]
    assert not_applied(load_config("configs/train/debug.yaml", [])) == []


def test_text_files_need_a_tokenizer_that_fits_the_vocabulary_and_held_out_files_go_with_them(tmp_path):
    """--text-files without --text-tokenizer, or with one of more ids than model.text_vocab_size (as many is
    fine), --valid-text-files naming a training file, and --valid-text-files on a run reading its data's captions
    are refused, naming the setting; blank lines are not counted as left out."""
    from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
    from training.captions import caption_source, held_out_captions
    from training.config import ConfigError, load_config

    (tmp_path / "captions.txt").write_text("a red circle\n\n  \ntwo green cats\n")
    spm = str(train_sentencepiece(["a red circle two green cats"] * 50, 30, tmp_path / "spm.model"))
    size = TextTokenizer(spm).vocab_size
    files = [str(tmp_path / "captions.txt")]
    with pytest.raises(ConfigError, match="--text-files needs --text-tokenizer"):
        caption_source(load_config("configs/train/debug.yaml", []), files, None)
    with pytest.raises(ConfigError, match=rf"spm.model: {size} ids do not fit model.text_vocab_size={size - 1}$"):
        caption_source(load_config("configs/train/debug.yaml", [f"model.text_vocab_size={size - 1}"]), files, spm)
    captions = caption_source(load_config("configs/train/debug.yaml", [f"model.text_vocab_size={size}"]), files, spm)
    assert len(captions) == 2 and captions.left_out == 0
    cfg = load_config("configs/train/debug.yaml", [])
    # A held-out file that is a training one (by any path) is refused; a missing one is named as held out.
    again = str(tmp_path / ".." / tmp_path.name / "captions.txt")
    with pytest.raises(ConfigError, match=rf"--valid-text-files: {tmp_path}/captions\.txt is also in --text-files"):
        held_out_captions(cfg, captions, [again])
    with pytest.raises(ConfigError, match=rf"^--valid-text-files {tmp_path}/none\.txt: no such file"):
        held_out_captions(cfg, captions, [str(tmp_path / "none.txt")])
    with pytest.raises(ConfigError, match="--valid-text-files goes with --text-files"):
        held_out_captions(cfg, caption_source(cfg, None, None), files)
    # Held-out lines that are training lines too (in the one pass over the training files) are counted.
    held = tmp_path / "held_out.txt"
    held.write_text(" two green cats\n" * 2 + "a red square\n" * 29 + "\xff a red circl\n")
    captions = caption_source(cfg, files, spm, [str(held)])
    assert captions.found == {"two green cats"} and captions.watched == 1
    (held_out,) = held_out_captions(cfg, captions, [str(held)]).values()
    assert len(held_out) == 32 and held_out.watched == 2 and held_out.found == {"two green cats"}
    assert caption_source(cfg, files, spm).watched == 0


def damage_first_record(folder: Path, where: int) -> None:
    """Flip 4 bytes of the first tensor record of folder's tensor index at `where` from its start (70: inside the
    pickle of its zip, which verify's few bytes per record do not read), or from its end if negative (-22: its
    zip's end-of-directory signature)."""
    from training.checkpoint_verify import read_index

    info = min(read_index(folder).storage_data.values(), key=lambda i: (i.relative_path, i.offset))
    at = info.offset + (where if where >= 0 else info.length + where)
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(at)
        data = f.read(4)
        f.seek(at)
        f.write(bytes(b ^ 0xFF for b in data))


def test_a_damaged_encoder_folder_or_checkpoint_is_refused_in_one_line_naming_it(pretrained, single_process,
                                                                                  tmp_path):
    """A pre-trained encoder's folder or a pre-training checkpoint damaged past the first bytes of its records:
    a CheckpointError naming the folder (and the .distcp file, where verify finds the damage), a config.json
    cut short a ConfigError naming it (each was a traceback: a CheckpointException, a JSONDecodeError)."""
    import shutil

    from common.checkpoints import CheckpointError
    from model_parallel.model import PartiModel
    from training.config import ConfigError, load_config
    from training.text_encoder import load_text_encoder

    cfg = load_config("configs/train/debug.yaml", [])
    cases = [(lambda f: (f / "config.json").write_text((pretrained[1] / "config.json").read_text()[:100]),
              ConfigError, r"encoder/config\.json cannot be read \(Unterminated string.*expected the JSON"),
             (lambda f: damage_first_record(f, -22), CheckpointError,
              r"encoder/__0_0\.distcp is corrupt: the tensor record at byte 0 does not end where"),
             (lambda f: damage_first_record(f, 70), CheckpointError,
              r"^model\.init_text_encoder=.*encoder: cannot read the encoder's tensors \((Unpickling|UnicodeDecode)")]
    for damage, error, message in cases:
        folder = tmp_path / "encoder"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(pretrained[1], folder)
        damage(folder)
        with pytest.raises(error, match=message):
            load_text_encoder(PartiModel(cfg.model), cfg.model, folder)
    run_dir = tmp_path / "run"
    shutil.copytree(pretrained[1].parent, run_dir)
    damage_first_record(run_dir / "checkpoints" / "step_00000040", 70)
    with pytest.raises(CheckpointError, match=r"step_00000040: cannot read the checkpoint's tensors "
                                              r"\((Unpickling|UnicodeDecode)Error: .*delete this folder"):
        pretrain_at(str(run_dir), "train.steps=41", *HELD_OUT)
