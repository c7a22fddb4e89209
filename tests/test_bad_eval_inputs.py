"""Bad inputs to the evaluation and planning commands: each is one line naming the file or flag and what
was expected, a non-zero exit, and earlier results left as they were. The commands run in-process
(main(argv), SystemExit caught): every case fails before a model is built or loaded, except the CLIP score of
an unreadable image, which loads a tiny random CLIP first."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.test_fid import image_folder, tiny_weights


def fid_with_truncated_png(tmp: Path, where: str):
    from evaluation.fid import main

    real, fake = image_folder(tmp / "real", 4, seed=0), image_folder(tmp / "fake", 4, seed=1)
    broken = (real if where == "real" else fake) / "00002.png"
    broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
    (fake / "fid.json").write_text('{"fid": 12.5}')  # an earlier result
    argv = ["--real", str(real), "--fake", str(fake), "--weights", str(tiny_weights(tmp / "tiny.pt")),
            "--cache-dir", str(tmp / "cache")]
    results = [fake, real] + ([tmp / "cache"] if where == "real" else [])  # no statistics of a broken real set
    return main, argv, f"{re.escape(str(broken))}: not a readable image .*expected a complete PNG", results


def clip_score_case(tmp: Path, damage: str):
    """A folder as evaluation.generate leaves it (two prompts), an earlier clip_score.json, one thing damaged."""
    from evaluation.clip_score import main
    from tests.test_evaluation import build_tiny_clip, fake_generation

    samples = tmp / "samples"
    fake_generation(samples, 2)
    lines = [json.dumps({"prompt": f"prompt {i}", "index": i, "files": [f"{i:05d}_0.png"]}) for i in range(2)]
    if damage == "png":
        broken = samples / "00001_0.png"
        broken.write_bytes(broken.read_bytes()[: len(broken.read_bytes()) // 2])
        expected = f"{re.escape(str(broken))}: not a readable image .*expected a complete PNG"
        build_tiny_clip(tmp / "clip")
    elif damage == "json":
        lines[1] = lines[1][:30]  # a line cut short
        expected = f"{re.escape(str(samples / 'metadata.jsonl'))}:2: not valid JSON .*expected one JSON object per line"
    elif damage == "empty":
        lines = []
        expected = f"{re.escape(str(samples / 'metadata.jsonl'))} lists no images; expected those evaluation.generate"
    else:
        lines[0] = json.dumps({"prompt": "a", "index": 0})
        expected = (f"{re.escape(str(samples / 'metadata.jsonl'))}:1: no files; "
                    "expected a JSON object with prompt, index, files")
    (samples / "metadata.jsonl").write_text("".join(line + "\n" for line in lines))
    (samples / "clip_score.json").write_text('{"clip_score": 30.0}')  # an earlier result
    return main, ["--samples", str(samples), "--clip", f"local-dir:{tmp / 'clip'}"], expected, [samples]


def benchmark_without_prompts(tmp: Path):
    from evaluation.benchmark import main

    prompts, out = tmp / "prompts.txt", tmp / "out"
    prompts.write_text("\n  \n", encoding="utf-8")
    out.mkdir()
    (out / "results.json").write_text('{"clip_score": 30.0}')  # an earlier result
    argv = ["--config", "configs/eval/partiprompts.yaml", "--set", "model.checkpoint=x", "model.vq=y",
            "model.text_tokenizer=z", "clip.model=local-dir:c", f"benchmark.prompts={prompts}", f"benchmark.out={out}"]
    return main, argv, f"prompt file {re.escape(str(prompts))}: no prompts; expected a prompt file with", [out]


def benchmark_case(tmp: Path, *sets: str, expected: str):
    """evaluation.benchmark on one prompt with `sets` laid over the PartiPrompts config; its model paths do not
    exist, so what is refused is refused before the model would be loaded."""
    from evaluation.benchmark import main

    prompts, out = tmp / "prompts.txt", tmp / "out"
    prompts.write_text("a red circle\n", encoding="utf-8")
    out.mkdir()
    (out / "results.json").write_text('{"clip_score": 30.0}')  # an earlier result
    argv = ["--config", "configs/eval/partiprompts.yaml", "--set", "model.checkpoint=x", "model.vq=y",
            "model.text_tokenizer=z", "clip.model=local-dir:c", f"benchmark.prompts={prompts}", f"benchmark.out={out}",
            *sets]
    return main, argv, expected, [out]


def not_an_upsampler(tmp: Path) -> Path:
    (tmp / "sr.pt").write_bytes(b"not a torch file")
    return tmp / "sr.pt"


def fake_export(folder: Path) -> Path:
    """Just enough of an export folder (config.json + model.safetensors) to pass the folder check."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": {}, "checkpoint": "step_00000003"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def fake_run(tmp: Path, exported: bool = False) -> Path:
    """A training run's layout: checkpoints/step_*/trainer_state.json and checkpoints/latest."""
    run = tmp / "run"
    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("step_00000003\n")
    if exported:
        fake_export(run / "export")
    return run


def generate_case(tmp: Path, checkpoint: Path, prompts: Path | None = None):
    from evaluation.generate import main

    if prompts is None:
        prompts = tmp / "prompts.txt"
        prompts.write_text("a red circle\n", encoding="utf-8")
    out = tmp / "out"
    out.mkdir()
    (out / "00000_0.png").write_bytes(b"an earlier image")
    argv = ["--checkpoint", str(checkpoint), "--vq", str(tmp / "vq.pt"), "--text-tokenizer", str(tmp / "spm.model"),
            "--prompts", str(prompts), "--out", str(out)]
    return main, argv, [out]


def generate_without_prompts(tmp: Path):
    prompts = tmp / "prompts.tsv"
    prompts.write_text("Prompt\tCategory\n", encoding="utf-8")  # (a header only: as empty as an empty file)
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"), prompts)
    return main, argv, f"prompt file {re.escape(str(prompts))}: no prompts; expected a prompt file with", keep


def generate_non_utf8_prompts(tmp: Path):
    prompts = tmp / "prompts.tsv"
    prompts.write_bytes("Prompt\tCategory\nA caf\u00e9 at night\tPlaces\n".encode("latin-1"))
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"), prompts)
    return main, argv, f"{re.escape(str(prompts))}:2: not UTF-8 .*expected a UTF-8 prompt file", keep


def clip_score_non_utf8_metadata(tmp: Path):
    main, argv, _, keep = clip_score_case(tmp, "keys")
    metadata = tmp / "samples" / "metadata.jsonl"
    metadata.write_bytes(metadata.read_bytes() + '{"prompt": "caf\u00e9"}\n'.encode("latin-1"))
    return main, argv, f"{re.escape(str(metadata))}:3: not UTF-8 text .*expected one JSON object per line", keep


def generate_run_dir(tmp: Path):
    run = fake_run(tmp)
    main, argv, keep = generate_case(tmp, run)
    return (main, argv, f"--checkpoint {re.escape(str(run))} is a training run folder, not an export folder; export it "
            f"first with `python -m training.export --run-dir {re.escape(str(run))}` and pass "
            f"{re.escape(str(run / 'export'))}$", keep)


def generate_exported_run_dir(tmp: Path):
    run = fake_run(tmp, exported=True)
    main, argv, keep = generate_case(tmp, run)
    expected = f"is a training run folder, not an export folder; pass its export {re.escape(str(run / 'export'))}"
    return main, argv, expected, keep


def generate_step_dir(tmp: Path):
    run = fake_run(tmp)
    step = run / "checkpoints" / "step_00000003"
    main, argv, keep = generate_case(tmp, step)
    return (main, argv, f"--checkpoint {re.escape(str(step))} is a checkpoint step folder of the training run "
            f"{re.escape(str(run))}, not an export folder; export it first with `python -m training.export --run-dir "
            f"{re.escape(str(run))} --tag step_00000003` and pass {re.escape(str(run / 'export'))}$", keep)


def generate_checkpoints_dir(tmp: Path):
    run = fake_run(tmp)
    main, argv, keep = generate_case(tmp, run / "checkpoints")
    return main, argv, f"the checkpoints folder of the training run {re.escape(str(run))}, not an export folder", keep


def generate_weights_file(tmp: Path):
    weights = fake_export(tmp / "export") / "model.safetensors"
    main, argv, keep = generate_case(tmp, weights)
    expected = f"is a file; expected an export folder .* pass the folder holding it: {re.escape(str(weights.parent))}"
    return main, argv, expected, keep


def generate_missing_clip_weights(tmp: Path):
    """Refused before the model is loaded (minutes for a real export; here the empty stand-in files would fail)."""
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"))
    (tmp / "vq.pt").write_bytes(b"")
    (tmp / "spm.model").write_bytes(b"")
    argv += ["--clip", "ViT-B-32", "--clip-weights", str(tmp / "nope.pt"), "--keep", "1"]
    return main, argv, f"--clip ViT-B-32: CLIP weights {re.escape(str(tmp / 'nope.pt'))} do not exist$", keep


def plan_case(*flags: str, expected: str):
    def case(tmp: Path):
        from training.plan import main

        return main, ["--model", "parti-debug", "--nodes", "1", "--gpus-per-node", "2", "--global-batch", "8",
                      *flags], expected, []
    return case


CASES = {
    "fid: truncated PNG among the generated images": lambda tmp: fid_with_truncated_png(tmp, "fake"),
    "fid: truncated PNG among the real images": lambda tmp: fid_with_truncated_png(tmp, "real"),
    "clip_score: truncated PNG among the samples": lambda tmp: clip_score_case(tmp, "png"),
    "clip_score: metadata.jsonl line cut short": lambda tmp: clip_score_case(tmp, "json"),
    "clip_score: metadata.jsonl line without files": lambda tmp: clip_score_case(tmp, "keys"),
    "clip_score: metadata.jsonl of no image": lambda tmp: clip_score_case(tmp, "empty"),
    "clip_score: metadata.jsonl not UTF-8": clip_score_non_utf8_metadata,
    "benchmark: no prompts": benchmark_without_prompts,
    "benchmark: a seed of 2**32": lambda tmp: benchmark_case(
        tmp, "sampling.seed=4294967296", expected=r"sampling.seed=4294967296 must be in \[0, 2\*\*32\)"),
    "benchmark: coco30k without its real images": lambda tmp: benchmark_case(
        tmp, "benchmark.name=coco30k", f"benchmark.real={tmp / 'coco'}",
        expected=rf"benchmark.real={re.escape(str(tmp / 'coco'))}: .*coco: no such folder"),
    # (benchmark.real as shared:NAME, the reference data beside the project, as benchmark.prompts; FID failed after
    # the whole generation and CLIP score)
    "benchmark: coco30k of one image": lambda tmp: benchmark_case(
        tmp, "benchmark.name=coco30k", "benchmark.real=shared:coco_mini/images", "benchmark.limit=1",
        "sampling.samples_per_prompt=1", "sampling.keep=0",
        expected=r"coco30k: 1 prompt\(s\) x 1 image\(s\) each; FID needs at least 2 generated images"),
    "benchmark: coco30k of one kept image": lambda tmp: benchmark_case(  # (2 samples drawn, the best 1 kept)
        tmp, "benchmark.name=coco30k", "benchmark.real=shared:coco_mini/images", "benchmark.limit=1",
        "sampling.samples_per_prompt=2", "sampling.keep=1",
        expected=r"coco30k: 1 prompt\(s\) x 1 image\(s\) each; FID needs at least 2 generated images"),
    "benchmark: no such upsampler": lambda tmp: benchmark_case(
        tmp, "model.upsampler=/nonexistent/sr.pt", expected=r"model.upsampler=/nonexistent/sr.pt: no such file"),
    "benchmark: an upsampler that is not an export": lambda tmp: benchmark_case(
        tmp, f"model.upsampler={not_an_upsampler(tmp)}",
        expected=r"model.upsampler=\S*sr.pt: not a readable upsampler export .*expected sr.train's export.pt"),
    "benchmark: grids of no prompts": lambda tmp: benchmark_case(
        tmp, "benchmark.grid_prompts=0", expected=r"benchmark.grid_prompts=0 must be >= 1"),
    "benchmark: out is a file": lambda tmp: benchmark_case(
        tmp, f"benchmark.out={tmp / 'prompts.txt'}", expected=r"benchmark.out \S*prompts.txt: a file, not a folder"),
    "generate: non-UTF-8 prompt file": generate_non_utf8_prompts,
    "generate: --checkpoint is a training run": generate_run_dir,
    "generate: --checkpoint is an exported training run": generate_exported_run_dir,
    "generate: --checkpoint is a checkpoint step": generate_step_dir,
    "generate: --checkpoint is the checkpoints folder": generate_checkpoints_dir,
    "generate: --checkpoint is the weights file": generate_weights_file,
    "generate: missing CLIP weights": generate_missing_clip_weights,
    "benchmark: an unknown CLIP tag": lambda tmp: benchmark_case(
        tmp, "clip.model=ViT-B-32", f"clip.weights={tmp / 'prompts.txt'}", "clip.tag=nosuchtag",  # (a file there)
        expected=r"clip.model=ViT-B-32: CLIP tag 'nosuchtag' is not an open_clip pretrained tag of ViT-B-32"),
    "plan: 0 nodes": plan_case("--nodes", "0", expected="--nodes must be a whole number >= 1, got 0$"),
    "plan: negative nodes": plan_case("--nodes", "-2", expected="--nodes must be a whole number >= 1, got -2$"),
    "plan: 0 GPUs per node": plan_case("--gpus-per-node", "0", expected="--gpus-per-node must be .* got 0$"),
    "plan: negative GPUs per node": plan_case("--gpus-per-node", "-8", expected="--gpus-per-node must be .* got -8$"),
    "plan: 0 global batch": plan_case("--global-batch", "0", expected="--global-batch must be .* got 0$"),
    "plan: negative micro-batch": plan_case("--micro-batch", "-1", expected="--micro-batch must be .* got -1$"),
    "plan: 0 micro-batch": plan_case("--micro-batch", "0", expected="--micro-batch must be .* got 0$"),
    "plan: 0 GPU memory": plan_case("--gpu-mem-gb", "0", expected="--gpu-mem-gb must be a number > 0, got 0.0$"),
    "plan: negative GPU memory": plan_case("--gpu-mem-gb", "-80", expected="--gpu-mem-gb must be .* got -80.0$"),
    "plan: 0 utilisation": plan_case("--hfu", "0",
                                     expected=r"--hfu must be a fraction of the peak in \(0, 1\], got 0.0$"),
    "plan: negative utilisation": plan_case("--hfu", "-0.4", expected=r"--hfu must be .* got -0.4$"),
    "plan: utilisation over 1": plan_case("--hfu", "40", expected=r"--hfu must be .* got 40.0$"),
    "plan: ZeRO stage 4": plan_case("--zero", "1,4",
                                    expected=r"--zero must be stages 0-3 separated by commas, got '1,4'$"),
    "plan: dropout over 1": plan_case("--dropout", "1.5",
                                      expected=r"--dropout must be a probability in \[0, 1\), got 1.5$"),
    "plan: negative overhead": plan_case("--overhead-ms", "-1",
                                         expected=r"--overhead-ms must be a number >= 0, got -1.0$"),
    "plan: 0 peak TFLOP/s": plan_case("--peak-tflops", "0", expected="--peak-tflops must be a number > 0, got 0.0$"),
    "plan: 0 network bandwidth": plan_case("--inter-node-gbs", "0", expected="--inter-node-gbs must be .* got 0.0$"),
}


def snapshot(folders: list[Path]) -> dict:
    return {p: p.read_bytes() for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_naming_it(case, tmp_path, capsys):
    main, argv, expected, results = CASES[case](tmp_path)
    before = snapshot(results)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    message = exit.value.code
    assert isinstance(message, str), message  # sys.exit(str): printed to stderr, exit status 1
    assert "\n" not in message and re.search(expected, message), message
    assert snapshot(results) == before  # earlier results untouched, nothing added


def test_no_layout_fits_says_why(capsys):
    """Memory: each closest miss says by how much it is over; batch: which split does not divide it."""
    from training.plan import main

    with pytest.raises(SystemExit) as exit:
        main(["--model", "parti-350m", "--nodes", "1", "--gpus-per-node", "2", "--global-batch", "8",
              "--gpu-mem-gb", "6", "--show", "2"])  # 3.3 GB per GPU at best, with 4 GB headroom
    out = capsys.readouterr().out
    assert exit.value.code == 1 and "no layout fits; why the closest ones miss:" in out
    rows = [line for line in out.splitlines() if "over by" in line]
    assert len(rows) == 2
    # the least memory any micro-batch and recomputation needs: micro-batch 1, full recomputation
    assert all("micro-batch 1   recompute full" in r for r in rows)
    assert all(re.search(r"over by 1\.7 GB in training \(3\.3 \+ 10% \+ 4 headroom > 6\)$", r) for r in rows)
    with pytest.raises(SystemExit) as exit:
        main(["--model", "parti-debug", "--nodes", "1", "--gpus-per-node", "3", "--global-batch", "8",
              "--micro-batch", "3"])
    out = capsys.readouterr().out
    assert exit.value.code == 1 and "no layout fits" in out
    assert "TP=1  PP=1  DP=3    global batch 8 is not a multiple of micro-batch 3 x DP 3 = 9" in out


# ----------------------------------------------------------------------------------------------
# evaluation.generate's sampling inputs (counts, sampling settings, the files it reads, JSONL prompts): each
# refused before the model is loaded, naming the flag and what was expected, the output folder untouched.


def generate_flags(*flags: str, expected: str, files: tuple[str, ...] = (), prompts: str | None = None):
    """A generate case with `flags` added; `files`: inputs that exist (dummy contents); `prompts`: the
    contents of a prompts.jsonl to read instead of the default prompts.txt."""
    def case(tmp: Path):
        for name in files:
            (tmp / name).write_bytes(b"not read")
        path = None
        if prompts is not None:
            path = tmp / "prompts.jsonl"
            path.write_text(prompts, encoding="utf-8")
        main, argv, keep = generate_case(tmp, fake_export(tmp / "export"), path)
        return main, [*argv, *flags], expected, keep
    return case


def generate_with_a_text_tokenizer_that_is_not_one(tmp: Path):
    from vq.tokenizer import ConvVQ, save_image_tokenizer

    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64), tmp / "vq.pt")
    (tmp / "spm.model").write_bytes(b"not a model")
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"))
    return main, argv, r"spm.model: not a SentencePiece model \(.*\); expected the .model file of", keep


def generate_with_an_edited_vq(tmp: Path, edit: str):
    import torch

    from vq.tokenizer import ConvVQ, save_image_tokenizer

    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=16, code_dim=8, codebook_size=64), tmp / "vq.pt")
    blob = torch.load(tmp / "vq.pt", weights_only=True)
    blob["config"].update(codebook_size=32) if edit == "size" else blob["config"].update(colour="red")
    torch.save(blob, tmp / "vq.pt")
    (tmp / "spm.model").write_bytes(b"not read")
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"))
    return main, argv, r"vq.pt: a conv_vq export whose config and weights do not make a tokenizer", keep


def generate_into_a_file(tmp: Path):
    main, argv, keep = generate_case(tmp, fake_export(tmp / "export"))
    (tmp / "out.png").write_bytes(b"an image")
    argv[argv.index("--out") + 1] = str(tmp / "out.png")
    return main, argv, r"--out \S*out.png: a file, not a folder", [*keep, tmp]


SAMPLING_CASES = {
    "samples per prompt 0": generate_flags(
        "--samples-per-prompt", "0",
        expected=r"--samples-per-prompt \(sampling.samples_per_prompt\) must be >= 1, not 0$"),
    "negative batch size": generate_flags(
        "--batch-size", "-1",
        expected=r"--batch-size \(sampling.batch_size\) must be >= 0 \(0: chosen for the device\), not -1$"),
    "negative keep": generate_flags("--keep", "-1", expected=r"--keep \(sampling.keep\) must be >= 0, not -1$"),
    "keep more than sampled": generate_flags("--keep", "3", "--samples-per-prompt", "2", "--clip", "ViT-B-32",
                                             expected=r"--keep 3 keeps more than the 2 sample\(s\) per prompt"),
    "--clip-weights without --clip": generate_flags("--clip-weights", "clip.pt",
                                                    expected=r"--clip-weights/--clip-tag without --clip: give --clip"),
    "--clip-tag without --clip": generate_flags("--clip-tag", "openai",
                                                expected=r"--clip-weights/--clip-tag without --clip: give --clip"),
    "a prompt file of no prompt": lambda tmp: generate_without_prompts(tmp),
    "negative limit": generate_flags("--limit", "-1", expected=r"--limit must be >= 0 \(0: all prompts\), not -1$"),
    "top-p 0": generate_flags("--top-p", "0", expected=r"sampling.top_p \(--top-p\) must be in \(0, 1\] .*, not 0.0$"),
    "negative temperature": generate_flags(
        "--temperature", "-1", expected=r"sampling.temperature \(--temperature\) must be >= 0 .*, not -1.0$"),
    "negative top-k": generate_flags("--top-k", "-3",
                                     expected=r"sampling.top_k \(--top-k\) must be >= 0 .*, not -3$"),
    "missing --vq": generate_flags(expected=r"--vq \S*vq.pt: no such file; expected the export.pt of vq.train$"),
    "missing --text-tokenizer": generate_flags(files=("vq.pt",),
                                               expected=r"--text-tokenizer \S*spm.model: no such file; expected a "
                                                        r"SentencePiece .model file$"),
    "missing --upsampler": generate_flags("--upsampler", "/nonexistent/sr.pt", files=("vq.pt", "spm.model"),
                                          expected=r"--upsampler /nonexistent/sr.pt: no such file"),
    "--vq not an export": generate_flags(files=("vq.pt", "spm.model"), expected=r"vq.pt: not an image tokenizer "
                                         r"export \(.*\); expected the export.pt of vq.train"),
    "--text-tokenizer not SentencePiece": lambda tmp: generate_with_a_text_tokenizer_that_is_not_one(tmp),
    "--out a file": lambda tmp: generate_into_a_file(tmp),
    # (read after the model and CLIP: minutes late)
    "--upsampler not an export": lambda tmp: generate_flags(
        "--upsampler", str(not_an_upsampler(tmp)), files=("vq.pt", "spm.model"),
        expected=r"--upsampler \S*sr.pt: not a readable upsampler export .*expected sr.train's export.pt")(tmp),
    "--vq with another codebook size written in": lambda tmp: generate_with_an_edited_vq(tmp, "size"),
    "--vq with an unknown config key written in": lambda tmp: generate_with_an_edited_vq(tmp, "key"),
    "negative seed": generate_flags("--seed", "-1", expected=r"--seed must be in \[0, 2\*\*32\), not -1$"),
    # (numpy's SeedSequence splits larger seeds into 32-bit words: seed 2**32's prompt 7 drew as seed 0's prompt 1)
    "seed of 2**32": generate_flags("--seed", str(2**32),
                                    expected=r"--seed must be in \[0, 2\*\*32\), not 4294967296$"),
    "JSONL line not an object": generate_flags(prompts='{"prompt": "a cat"}\n"a dog"\n',
                                               expected=r"prompts.jsonl:2: a JSON string, not an object"),
}


@pytest.mark.parametrize("case", list(SAMPLING_CASES))
def test_bad_generate_input_is_one_line_naming_it(case, tmp_path):
    main, argv, expected, results = SAMPLING_CASES[case](tmp_path)
    before = snapshot(results)
    with pytest.raises(SystemExit) as exit:
        main(argv)
    message = exit.value.code
    assert isinstance(message, str), message
    assert "\n" not in message and re.search(expected, message), message
    assert snapshot(results) == before


def test_generate_keep_without_clip_is_a_usage_error(tmp_path, capsys):
    """--keep N (even 1) ranks by CLIP score: without --clip it is argparse's usage error (exit status 2) naming
    --clip, before any file is read; not N unranked samples kept."""
    main, argv, _ = generate_case(tmp_path, fake_export(tmp_path / "export"))
    with pytest.raises(SystemExit) as exit:
        main([*argv, "--keep", "1"])
    assert exit.value.code == 2 and "--keep ranks samples by CLIP score: give --clip" in capsys.readouterr().err


def test_generate_loads_the_reranking_clip_with_its_tag(tmp_path, monkeypatch):
    """--clip-tag reaches ClipScorer.load (the weights' mean/std and activation): dropped there, reranking ran
    the architecture's defaults. The model and CLIP are stand-ins; the stand-in CLIP stops the run."""
    from evaluation import generate as generate_module

    main, argv, _ = generate_case(tmp_path, fake_export(tmp_path / "export"))
    for name in ("vq.pt", "spm.model", "clip.pt"):
        (tmp_path / name).write_bytes(b"not read")
    loaded = []
    monkeypatch.setattr(generate_module, "load_for_sampling", lambda *a: (None, None, None))

    def load(model, weights, device, tag=None):
        loaded.append((model, weights, tag))
        raise ValueError("stand-in CLIP: stop here")

    monkeypatch.setattr(generate_module.ClipScorer, "load", load)
    with pytest.raises(SystemExit, match="stand-in CLIP: stop here"):
        main([*argv, "--clip", "ViT-B-32", "--clip-weights", str(tmp_path / "clip.pt"), "--clip-tag", "openai"])
    assert loaded == [("ViT-B-32", str(tmp_path / "clip.pt"), "openai")]


# ----------------------------------------------------------------------------------------------
# evaluation.generate's checks of the export it is given (check_export, export_identity, its config.json and
# data_tokenizers), called directly.


def test_check_export_tells_each_kind_of_folder_apart_and_what_to_pass(tmp_path):
    """check_export on what a --checkpoint can wrongly name: a missing path, an export cut short, a run's checkpoints
    folder without `latest`, a step folder without its state, and step folders of a run exported from that step
    or another one (each advice names the folder to pass)."""
    from evaluation.generate import check_export

    with pytest.raises(FileNotFoundError, match=r"--checkpoint \S*nowhere does not exist; expected an export"):
        check_export(tmp_path / "nowhere", "--checkpoint")
    half = fake_export(tmp_path / "half")
    (half / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"half has no model.safetensors; expected an export"):
        check_export(half)
    run = fake_run(tmp_path / "a")
    (run / "checkpoints" / "latest").unlink()  # (no checkpoint finished yet: the folder's name tells it)
    with pytest.raises(ValueError, match=rf"is the checkpoints folder of the training run {re.escape(str(run))},"):
        check_export(run / "checkpoints")
    (run / "checkpoints" / "step_00000005").mkdir()  # (its trainer_state.json not written yet)
    with pytest.raises(ValueError, match=r"step_00000005 is a checkpoint step folder of the training run"):
        check_export(run / "checkpoints" / "step_00000005")
    (run / "export").mkdir()
    (run / "export" / "config.json").write_text(json.dumps({"checkpoint": "step_00000003"}))  # an export cut short
    with pytest.raises(ValueError, match=rf"export it first with `python -m training.export --run-dir "
                                         rf"{re.escape(str(run))}` and pass {re.escape(str(run / 'export'))}$"):
        check_export(run)
    exported = fake_run(tmp_path / "b", exported=True)  # (exported from step_00000003)
    with pytest.raises(ValueError, match=rf"pass its export {re.escape(str(exported / 'export'))} \(made from "
                                         r"step_00000003\)$"):
        check_export(exported / "checkpoints" / "step_00000003")
    other = exported / "checkpoints" / "step_00000005"
    other.mkdir()
    (other / "trainer_state.json").write_text("{}")
    target = re.escape(str(exported / "export_step_00000005"))
    with pytest.raises(ValueError, match=rf"--tag step_00000005 --out {target}` and pass {target}$"):
        check_export(other)
    # An export of the mean of checkpoints (training.export --average) is not offered for one of them alone
    config = exported / "export" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "averaged": "step_00000001,step_00000003"}))
    target = re.escape(str(exported / "export_step_00000003"))
    with pytest.raises(ValueError, match=rf"--tag step_00000003 --out {target}` and pass {target}$"):
        check_export(exported / "checkpoints" / "step_00000003")
    with pytest.raises(ValueError, match=r"pass its export .* \(the mean of step_00000001,step_00000003\)$"):
        check_export(exported)


def test_export_identity_is_the_resolved_path_tag_and_weights_size(tmp_path, monkeypatch):
    """A relative --checkpoint is recorded resolved (a rerun from another directory names the same export), with
    the export's checkpoint tag and its weights' size."""
    from evaluation.generate import export_identity

    export = fake_export(tmp_path / "export")
    (export / "model.safetensors").write_bytes(b"12345")
    monkeypatch.chdir(tmp_path)
    identity = export_identity("export")
    assert identity["path"] == str(export.resolve()) and identity["tag"] == "step_00000003"
    assert identity["weights_bytes"] == 5 and "averaged" not in identity
    config = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**config, "averaged": "step_00000001,step_00000003"}))
    assert export_identity("export")["averaged"] == "step_00000001,step_00000003"  # (training.export --average)


def test_an_export_config_that_is_not_an_object_is_named(tmp_path):
    """A config.json holding JSON other than an object is named, not an AttributeError of .get."""
    from evaluation.generate import read_export_config

    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: a JSON list, expected an object"):
        read_export_config(tmp_path)


def test_load_for_sampling_refuses_tokenizers_other_than_the_exports_training_datas(tmp_path, monkeypatch):
    """The hashes in the export's data_tokenizers are checked before the model is loaded."""
    from types import SimpleNamespace

    from evaluation import generate as generate_module

    export = fake_export(tmp_path / "export")
    cfg = SimpleNamespace(image_seq_len=16, image_vocab_size=64, text_vocab_size=100, text_seq_len=8)
    monkeypatch.setattr(generate_module, "exported_model_config", lambda path: cfg)
    monkeypatch.setattr(generate_module, "load_image_tokenizer",
                        lambda path, device: SimpleNamespace(grid=4, codebook_size=64, content_hash="v2"))
    monkeypatch.setattr(generate_module, "TextTokenizer", lambda path, n: SimpleNamespace(vocab_size=100,
                                                                                         content_hash="t"))
    monkeypatch.setattr(generate_module, "exported_data_tokenizers",
                        lambda path: {"vq": {"hash": "v1"}, "text_tokenizer": {"hash": "t"}})
    monkeypatch.setattr(generate_module, "load_exported", lambda *a: pytest.fail("the model was loaded first"))
    with pytest.raises(ValueError, match="the image tokenizer given .* is not the one the model's training data"):
        generate_module.load_for_sampling(export, "vq.pt", "spm.model", "cpu")
