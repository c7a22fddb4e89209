"""Bad inputs to the data commands and to the trainer's data loading: one clear line naming the file and what
was expected, a non-zero exit (or ConfigError naming data.shards), earlier results left as they were."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.errors import DataError
from data_pipeline.images import FilterConfig
from data_pipeline.manifest import write_manifest
from data_pipeline.pretokenize import header, pretokenize
from data_pipeline.pretokenize import main as pretokenize_main
from data_pipeline.text_tokenizer import TextTokenizer, train_sentencepiece
from model_parallel.state import child_environment
from tests import laion_fixtures as lf
from vq.tokenizer import ConvVQ, load_image_tokenizer, save_image_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TEXT_LEN = 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """good.tar (4 small synthetic samples), not_a_tar.tar (an HTML error page), a 32-pixel VQ, a SentencePiece,
    and `codes/`: good.tar pre-tokenized by the same settings the command line below uses (its defaults)."""
    root = tmp_path_factory.mktemp("bad_data")
    lf.write_tar(root / "good.tar", lf.synthetic_samples(4))
    (root / "not_a_tar.tar").write_bytes(b"<html><body>502 Bad Gateway</body></html>\n" * 40)
    torch.manual_seed(0)
    save_image_tokenizer(ConvVQ(image_size=32, downsample=3, channels=8, code_dim=4, codebook_size=16), root / "vq.pt")
    train_sentencepiece([f"a {c} {s} on a white background" for c in lf.COLOURS for s in lf.SHAPES] * 10, 30,
                        root / "spm.model")
    vq, tok, filters = (load_image_tokenizer(root / "vq.pt"), TextTokenizer(root / "spm.model", TEXT_LEN),
                        FilterConfig(32))
    pretokenize([root / "good.tar"], root / "codes", vq, tok, filters)
    (root / "empty").mkdir()
    (root / "no_manifest").mkdir()  # a killed run: a finished shard, no manifest.json
    for ext in (".bin", ".json"):
        (root / "no_manifest" / f"00000{ext}").write_bytes((root / "codes" / f"00000{ext}").read_bytes())
    zero = root / "zero_records"  # every sample skipped
    zero.mkdir()
    (zero / "00000.bin").write_bytes(b"")
    (zero / "00000.json").write_text(json.dumps({"input": "x.tar", "records": 0, "seen": 4, "sha256": "",
                                                 "skipped": {"too_small": 4}, "header": header(vq, tok, filters)}))
    write_manifest(zero, header(vq, tok, filters), ["00000"])
    (root / "spm_out").mkdir()
    (root / "spm_out" / "spm.model").write_bytes(b"an earlier tokenizer")  # --out of the rows below: must survive
    return root


def pretokenize_cli(root: Path, inputs: str, vq: str = "vq.pt", output: str = "codes") -> list[str]:
    return ["data_pipeline.pretokenize", "--input", str(root / inputs), "--output", str(root / output),
            "--vq", str(root / vq), "--text-tokenizer", str(root / "spm.model"), "--text-len", str(TEXT_LEN)]


def tokenizer_cli(root: Path, inputs: str, vocab: int, out: str = "spm_out/spm.model", *more: str) -> list[str]:
    return ["data_pipeline.train_text_tokenizer", "--captions", str(root / inputs), "--vocab-size", str(vocab),
            "--out", str(root / out), *more]


def trainer_data(folder: str) -> list[str]:
    return ["training", folder]


# (what, how it is run, the file the message must name, what the message must say, the results that must survive)
CASES = [
    ("empty code-shard folder", lambda r: trainer_data("empty"), "empty",
     r"holds no code shards \(no manifest\.json, no NNNNN\.json\): expected the --output folder", "empty"),
    ("shards without manifest.json", lambda r: trainer_data("no_manifest"), "no_manifest/manifest.json",
     r"does not exist though 1 shard\(s\) do: the pre-tokenization did not finish", "no_manifest"),
    ("code-shard folder of 0 records", lambda r: trainer_data("zero_records"), "zero_records/manifest.json",
     r"0 records \(every sample of its 1 input shard\(s\) was skipped: \{'too_small': 4\}\)", "zero_records"),
    ("pretokenize: .tar that is not a tar", lambda r: pretokenize_cli(r, "{good,not_a_tar}.tar"), "not_a_tar.tar",
     r"is not a tar archive \(invalid header\); expected a webdataset shard", "codes"),
    ("pretokenize: --vq not an image tokenizer export",  # (a raw ValueError traceback)
     lambda r: pretokenize_cli(r, "good.tar", vq="spm.model"),
     "spm.model", r"not an image tokenizer export .*expected the export.pt of vq.train", "codes"),
    ("pretokenize: --output is a file", lambda r: pretokenize_cli(r, "good.tar", output="spm.model"),  # (traceback)
     "spm.model", r"File exists", "."),
    # (the manifest would be rebuilt over the inputs given, leaving out the shards of the others)
    ("pretokenize --manifest-only: other --input", lambda r: [*pretokenize_cli(r, "not_a_tar.tar"), "--manifest-only"],
     "codes/00000.bin", r"made from .*good\.tar.*: the --input pattern is not the one this folder was begun with",
     "codes"),
    ("train_text_tokenizer: .tar that is not a tar", lambda r: tokenizer_cli(r, "{good,not_a_tar}.tar", 20),
     "not_a_tar.tar", r"is not a tar archive \(invalid header\)", "spm_out"),
    ("train_text_tokenizer: vocabulary larger than the captions support",
     lambda r: tokenizer_cli(r, "good.tar", 5000, "spm_out/spm.model", "--overwrite"), "spm_out/spm.model",
     r"a vocabulary of 5000 was asked for, but the 4 captions support at most \d+ pieces .*(--vocab-size \d+)",
     "spm_out"),
    # (--out written over without a word: an earlier tokenizer gone, or the input shard itself made a model file)
    ("train_text_tokenizer: --out exists", lambda r: tokenizer_cli(r, "good.tar", 20), "spm_out/spm.model",
     r"exists \(a tokenizer, and the code shards made with it name its hash\): give another --out, or --overwrite",
     "spm_out"),
    ("train_text_tokenizer: --out is an input", lambda r: tokenizer_cli(r, "good.tar", 20, "good.tar", "--overwrite"),
     "good.tar", r"is one of the --captions shards", "."),
    ("train_text_tokenizer: --out is a folder", lambda r: tokenizer_cli(r, "good.tar", 20, "spm_out"),
     "spm_out", r"is a folder; expected the .model file to write", "spm_out"),
]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("what, command, names, says, kept", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(data, what, command, names, says, kept):
    before = snapshot(data / kept)
    argv = command(data)
    if argv[0] == "training":  # what the trainer calls: training_dataset wraps the error as a ConfigError
        from common.config import ConfigError
        from data_pipeline.training_data import training_dataset
        from training.config import load_config

        folder = data / argv[1]
        cfg = load_config(None, ["data.synthetic=false", f"data.shards={folder}", f"model.text_seq_len={TEXT_LEN}",
                                 "model.image_grid=4", "model.image_vocab_size=16", "model.text_vocab_size=32"])
        with pytest.raises(ConfigError) as e:
            training_dataset(cfg.data, cfg.model, cfg.train.seed)
        line = str(e.value)
        assert line.startswith(f"data.shards={str(folder)!r}: ")
    else:
        proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True,
                              env=child_environment(PYTHONPATH=str(ROOT)))
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert line.startswith("error: "), proc.stderr
    assert "\n" not in line and str(data / names) in line and re.search(says, line), line
    assert snapshot(data / kept) == before


def test_the_refused_vocabulary_names_the_largest_size_that_works(data, tmp_path):
    captions = [f"a {c} {s} on a white background" for c in lf.COLOURS for s in lf.SHAPES]
    with pytest.raises(DataError, match=r"at most (\d+) pieces") as e:
        train_sentencepiece(captions, 200, tmp_path / "a.model", allow_smaller=False)
    largest = int(re.search(r"at most (\d+) pieces", str(e.value)).group(1))
    assert not (tmp_path / "a.model").exists()
    tok = TextTokenizer(train_sentencepiece(captions, largest, tmp_path / "a.model", allow_smaller=False))
    assert tok.vocab_size == largest


def test_a_caption_with_no_piece_but_eos_is_skipped_not_made_the_null_caption(data, tmp_path):
    """A caption of zero-width spaces is not empty to str.strip(), but SentencePiece gives it no piece: its ids
    would be [EOS, PAD, ...], classifier-free guidance's null caption, and the image would train unconditioned.
    Pre-tokenization skips it as empty_caption (at batch size 1: a batch of no records is not encoded)."""
    *samples, (key, files) = lf.synthetic_samples(3)
    lf.write_tar(tmp_path / "in.tar", [*samples, (key, {**files, "txt": "\u200b\ufeff".encode()})])
    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    assert tok.encode("\u200b\ufeff")[1] == 1  # EOS alone
    manifest = pretokenize([tmp_path / "in.tar"], tmp_path / "codes", vq, tok, FilterConfig(32), batch_size=1)
    meta = json.loads((tmp_path / "codes" / "00000.json").read_text())
    assert manifest["records"] == 2 and meta["skipped"] == {"empty_caption": 1}


def test_a_wrong_input_is_refused_before_any_shard_is_made(data, tmp_path):
    """Every input of the task is checked to be a tar before the first is encoded: a wrong file last in the
    pattern stops the run at its start, not hours in with the shards before it made."""
    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    with pytest.raises(DataError, match=r"not_a_tar\.tar is not a tar archive"):
        pretokenize([data / "good.tar", data / "not_a_tar.tar"], tmp_path / "codes", vq, tok, FilterConfig(32))
    assert list((tmp_path / "codes").iterdir()) == []


@pytest.mark.parametrize("field", ["codes", "text"])
def test_an_id_the_tokenizers_should_not_give_is_refused_before_its_shard_is_written(data, tmp_path, monkeypatch,
                                                                                    field):
    """An image code equal to codebook_size (or a text id equal to vocab_size), the first outside its range (a
    tokenizer file that does not match its own header), is refused naming the input; no shard is written."""
    from data_pipeline import pretokenize as module

    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    if field == "codes":
        real = module.encode_images
        monkeypatch.setattr(module, "encode_images", lambda *a: real(*a) * 0 + vq.codebook_size)
    else:
        real_encode = TextTokenizer.encode

        def first_id_out_of_range(self, text):
            ids, length = real_encode(self, text)
            return [tok.vocab_size] + ids[1:], length

        monkeypatch.setattr(TextTokenizer, "encode", first_id_out_of_range)
    with pytest.raises(DataError, match=r"good\.tar: the tokenizers produced image code \d+ .*outside its range"):
        pretokenize([data / "good.tar"], tmp_path / "codes", vq, tok, FilterConfig(32))
    assert not list((tmp_path / "codes").glob("00000.*"))


@pytest.mark.parametrize("size_of", ["codebook_size", "vocab_size"])
def test_a_codebook_or_vocabulary_past_uint16_is_refused_and_one_of_65536_is_not(data, tmp_path, size_of):
    """Codes and text ids are stored as uint16, which holds the ids of 65536 entries: with 65537, id 65536 would
    wrap to 0 unseen (the range check compares the stored ids with the size). Refused before the folder exists."""
    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    tokenizer = vq if size_of == "codebook_size" else tok
    setattr(tokenizer, size_of, 65537)
    with pytest.raises(DataError, match="stored as uint16: codebook and vocabulary must be <= 65536"):
        pretokenize([data / "good.tar"], tmp_path / "refused", vq, tok, FilterConfig(32))
    assert not (tmp_path / "refused").exists()
    setattr(tokenizer, size_of, 65536)
    manifest = pretokenize([data / "good.tar"], tmp_path / "codes", vq, tok, FilterConfig(32))
    assert manifest["records"] == 4 and manifest["vq" if tokenizer is vq else "text_tokenizer"][size_of] == 65536


@pytest.mark.parametrize("args, says", [
    (["--shard-index", "2", "--num-shards", "2"], r"--shard-index 2 must be in 0\.\.1"),
    (["--batch-size", "0"], r"--batch-size must be >= 1 .* got 0 and 0"),
    (["--workers", "-1"], r"--workers >= 0, got 32 and -1")])
def test_pretokenize_refuses_a_task_index_or_batch_outside_its_range(tmp_path, capsys, args, says):
    """Task N of N would make task 0's shards as well (two writers of one shard), and --batch-size 0 wrote empty
    shards that a rerun took as finished: usage errors (status 2) before anything is loaded or made."""
    argv = ["--input", "x.tar", "--output", str(tmp_path / "codes"), "--vq", "vq.pt", "--text-tokenizer", "spm.model"]
    with pytest.raises(SystemExit) as e:
        pretokenize_main([*argv, *args])
    assert e.value.code == 2 and re.search(says, capsys.readouterr().err) and not (tmp_path / "codes").exists()


def test_an_input_replaced_by_another_of_its_name_is_refused_on_rerun(data, tmp_path):
    """A shard records its input's size: a rerun whose input of that name holds other samples (a re-download)
    is refused, naming both sizes, and nothing in the folder changes."""
    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    tar = lf.write_tar(tmp_path / "laion" / "00000.tar", lf.synthetic_samples(4))
    pretokenize([tar], tmp_path / "codes", vq, tok, FilterConfig(32))
    before = snapshot(tmp_path / "codes")
    lf.write_tar(tar, lf.synthetic_samples(30))
    with pytest.raises(DataError, match=r"00000\.bin was made from .*00000\.tar of \d+ bytes, .* has \d+"):
        pretokenize([tar], tmp_path / "codes", vq, tok, FilterConfig(32))
    assert snapshot(tmp_path / "codes") == before


def test_other_filter_settings_into_a_begun_folder_are_refused(data, tmp_path):
    """The filters' settings are in every shard's header: a rerun with another --max-punsafe (other samples
    kept) is refused, naming the setting, not continued into a folder of mixed selections."""
    vq, tok = load_image_tokenizer(data / "vq.pt"), TextTokenizer(data / "spm.model", TEXT_LEN)
    pretokenize([data / "good.tar"], tmp_path / "codes", vq, tok, FilterConfig(32))
    with pytest.raises(DataError, match=r"filters\.max_punsafe null there, 0\.5 now"):
        pretokenize([data / "good.tar"], tmp_path / "codes", vq, tok, FilterConfig(32, max_punsafe=0.5))
