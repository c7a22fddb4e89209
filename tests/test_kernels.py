"""Each fused kernel path against the plain one, where it is available here; selection rules."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError
from model_parallel.cross_entropy import fused_cross_entropy
from model_parallel.kernels import (
    KERNEL_CHOICES,
    availability,
    fused_bias_dropout_add,
    fused_bias_gelu,
    fused_split_heads,
    math_attention,
    plain_bias_dropout_add,
    plain_bias_gelu,
    plain_split_heads,
    sdpa_attention,
    select_kernels,
)
from training.config import KernelConfig

AVAILABLE = availability()


def _skip_unless(op, name):
    why_not = AVAILABLE[op][name]
    if why_not:
        pytest.skip(f"{op}={name}: {why_not}")


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_equals_math_attention(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = None if causal else (torch.arange(7) < torch.tensor([7, 4])[:, None])[:, None, None, :]
    out_sdpa = sdpa_attention(q, k, v, mask=mask, causal=causal)
    grads_sdpa = torch.autograd.grad(out_sdpa.square().sum(), (q, k, v))
    out_math = math_attention(q, k, v, mask=mask, causal=causal)
    grads_math = torch.autograd.grad(out_math.square().sum(), (q, k, v))
    torch.testing.assert_close(out_sdpa, out_math, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_sdpa, grads_math):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_bias_gelu_equals_plain():
    _skip_unless("bias_gelu", "fused")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 3, 16, generator=g, requires_grad=True)
    b = torch.randn(16, generator=g, requires_grad=True)
    fused = fused_bias_gelu(x, b)
    gf = torch.autograd.grad(fused.sum(), (x, b))
    plain = plain_bias_gelu(x, b)
    gp = torch.autograd.grad(plain.sum(), (x, b))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    for a, c in zip(gf, gp):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_bias_dropout_add_equals_plain(dtype):
    """The fused residual branch end (bias, keyed dropout mask, residual add) against the three plain operations,
    with and without a mask; values and the gradients of the output, bias and residual. In bf16 the fused
    kernel skips the rounding of `x + bias`: within a few bf16 ulps of the result."""
    _skip_unless("bias_dropout_add", "fused")
    g = torch.Generator().manual_seed(3)
    x, residual = (torch.randn(6, 3, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    bias = torch.randn(16, generator=g).to(dtype).requires_grad_()
    keep = torch.rand(6, 3, 16, generator=g) > 0.25
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for mask in (keep, None):
        outs = [fn(x, bias, residual, mask, 0.25) for fn in (fused_bias_dropout_add(), plain_bias_dropout_add)]
        grads = [torch.autograd.grad((out * out.detach()).sum(), (x, bias, residual)) for out in outs]
        torch.testing.assert_close(outs[0], outs[1], **tol)
        for a, c in zip(*grads):
            torch.testing.assert_close(a, c, **tol)
    assert not torch.equal(outs[1], plain_bias_dropout_add(x, bias, residual, keep, 0.25))  # (the mask acts)


def test_fused_split_heads_equals_plain():
    """The q / kv / qkv projections' bias add and split into heads, fused against plain: the same values, each
    fused part dense in [s, b, heads, head_dim] order (what makes an attention backward that allocates like its
    inputs hand the gradients back dense), the same gradient of the projection's output and the bias gradient
    to rounding; fp32 for the queries alone (plain's one dense view) and for qkv, bf16 for qkv; a second shape
    without recompiling."""
    _skip_unless("split_heads", "fused")
    g = torch.Generator().manual_seed(4)
    for dtype, parts in ((torch.float32, 1), (torch.float32, 3), (torch.bfloat16, 3)):
        for s, b in ((6, 3), (5, 2)):
            with torch._dynamo.config.patch(error_on_recompile=s == 5):
                x = torch.randn(s, b, parts * 4 * 8, generator=g).to(dtype).requires_grad_()
                bias = torch.randn(parts * 4 * 8, generator=g).to(dtype).requires_grad_()
                fused, plain = (fn(x, bias, parts, 8) for fn in (fused_split_heads, plain_split_heads))
                upstream = [torch.randn(t.shape, generator=g).to(dtype) for t in plain]
                grads = [torch.autograd.grad(out, (x, bias), upstream) for out in (fused, plain)]
            for f, p in zip(fused, plain, strict=True):
                assert f.shape == (b, 4, s, 8) and f.permute(2, 0, 1, 3).is_contiguous()
                assert torch.equal(f, p)
            assert parts == 1 or not plain[0].permute(2, 0, 1, 3).is_contiguous()  # (plain's: views of the sum)
            assert torch.equal(grads[0][0], grads[1][0])
            torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-5 if dtype == torch.float32 else 1e-2)


def test_fused_cross_entropy_equals_torch():
    """The loss's fused cross-entropy (TP=1) against torch's cross_entropy of the fp32 logits, fp32 and bf16 logits:
    per-token losses (fp32), gradients in the logits' dtype for a per-token upstream gradient; a second shape
    runs the same compiled code (dynamic shapes: no recompilation per micro-batch size). TP=2's vocabulary
    slices: test_tensor_parallel."""
    _skip_unless("cross_entropy", "fused")
    g = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((6, 3, 40), (5, 2, 40)):
            with torch._dynamo.config.patch(error_on_recompile=shape[0] == 5):
                logits = (torch.randn(shape, generator=g) * 4).to(dtype).requires_grad_()
                target = torch.randint(0, shape[-1], shape[:2], generator=g)
                upstream = torch.rand(shape[:2], generator=g)
                fused = fused_cross_entropy(logits, target)
                (grad,) = torch.autograd.grad(fused, logits, upstream)
            reference = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), reduction="none")
            (reference_grad,) = torch.autograd.grad(reference.view(shape[:2]), logits, upstream)
            assert fused.dtype == torch.float32 and grad.dtype == dtype
            torch.testing.assert_close(fused, reference.view(shape[:2]), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad, reference_grad, rtol=1e-5 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("name", ["apex", "te"])
def test_fused_layer_norm_equals_torch(name):
    _skip_unless("layernorm", name)
    kernels = select_kernels(KernelConfig(layernorm=name))
    fused, plain = kernels.layer_norm(32, 1e-5).cuda(), torch.nn.LayerNorm(32, eps=1e-5).cuda()
    with torch.no_grad():
        fused.weight.copy_(torch.randn(32)), fused.bias.copy_(torch.randn(32))
        plain.load_state_dict(fused.state_dict(), strict=False)
    x = torch.randn(4, 6, 32, device="cuda")
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["torch_fused", "apex", "deepspeed"])
def test_fused_optimizer_equals_torch_adamw(name):
    _skip_unless("optimizer", name)
    device = "cuda" if name in ("apex", "deepspeed") else "cpu"
    g = torch.Generator().manual_seed(2)
    init = torch.randn(10, 6, generator=g)
    grads = [torch.randn(10, 6, generator=g) for _ in range(4)]
    results = []
    for impl in (name, "torch"):
        p = torch.nn.Parameter(init.clone().to(device))
        opt = select_kernels(KernelConfig(optimizer=impl)).optimizer([p], lr=1e-2, betas=(0.9, 0.95),
                                                                       eps=1e-8, weight_decay=0.1)
        for grad in grads:
            p.grad = grad.to(device)
            opt.step()
        results.append(p.detach().cpu())
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(results[0], init)


def test_auto_selection_and_summary():
    kernels = select_kernels()
    for op in KERNEL_CHOICES:
        name, why = kernels.choices[op]
        assert AVAILABLE[op][name] is None and why.startswith("auto")
    if torch.cuda.is_available():
        assert kernels.name("dropout_mask") == "compiled"
    else:
        assert kernels.name("layernorm") == "torch" and kernels.name("bias_gelu") == "plain"
        assert kernels.name("bias_dropout_add") == "plain"
        assert kernels.name("dropout_mask") == "eager"  # (compiling costs a CPU run more than its masks)
        assert kernels.name("split_heads") == kernels.name("cross_entropy") == "plain"
        assert kernels.name("optimizer") == "torch"  # (AdamW's foreach path: faster than fused=True for small models)
    assert "attention=sdpa" in kernels.summary()
    assert kernels.summary().endswith("; layers eager (kernels.compile)")


def test_compile_without_a_compiler_is_refused_with_reason(monkeypatch):
    import shutil

    if torch.cuda.is_available():
        pytest.skip("the CPU rule: a GPU needs Triton instead")
    assert select_kernels(KernelConfig(compile=True)).compile
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="kernels.compile=true is not available: inductor needs a C"):
        select_kernels(KernelConfig(compile=True))
    assert not select_kernels(KernelConfig()).compile


def test_unavailable_choice_is_refused_with_reason():
    with pytest.raises(ConfigError, match="kernels.attention='flash3' is unknown; choose from sdpa, math"):
        select_kernels(KernelConfig(attention="flash3"))  # (a KernelConfig not validated: bench scripts build theirs)
    unavailable = [(op, n, why) for op, opts in AVAILABLE.items() for n, why in opts.items() if why]
    if not unavailable:
        pytest.skip("every implementation is available on this machine")
    op, name, why = unavailable[0]
    with pytest.raises(ConfigError, match=f"kernels.{op}='{name}' is not available: {why}"):
        select_kernels(KernelConfig(**{op: name}))


def test_gpu_compilation_needs_triton_and_a_c_compiler(monkeypatch):
    """On a GPU, inductor's kernels are Triton's, whose launcher Triton builds with a C compiler: a machine
    without either is told so before training (kernels.compile) or gets the eager dropout masks (auto)."""
    import shutil

    import torch.utils._triton

    from model_parallel.kernels import compile_unavailable

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert compile_unavailable() == "inductor needs Triton for CUDA kernels (pip install triton)"
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert compile_unavailable() == "Triton needs a C compiler (gcc)"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert compile_unavailable() is None


def test_gpu_without_compilers_gets_the_plain_bias_gelu_and_no_deepspeed_adam(monkeypatch):
    """megatron-core's fused bias-GeLU and the fused bias-dropout-add are torch.compile'd, and DeepSpeed's FusedAdam is
    built with nvcc on first use: on a GPU machine without Triton's C compiler `auto` takes the plain ones (saying why),
    and without nvcc kernels.optimizer=deepspeed is refused before training rather than failing at the first step."""
    import shutil

    import torch.utils._triton
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", None)
    kernels = select_kernels()
    for op in ("bias_gelu", "bias_dropout_add"):
        assert kernels.choices[op] == ("plain", "auto on gpu; skipped fused: Triton needs a C compiler (gcc)")
    assert kernels.name("dropout_mask") == "eager"
    with pytest.raises(ConfigError, match="kernels.optimizer='deepspeed' is not available: .*needs nvcc"):
        select_kernels(KernelConfig(optimizer="deepspeed"))


def test_compiled_layers_take_torchs_layer_norm_where_apex_or_te_would_be_chosen(monkeypatch):
    """Under kernels.compile inductor fuses torch's layer norm; apex's and TE's are opaque to dynamo (a graph break
    at each norm): auto takes torch's there, and TE's without compiling; asking for te still gets te."""
    import model_parallel.kernels as kernels

    options = {op: dict.fromkeys(names, None) for op, names in kernels.availability().items()}
    monkeypatch.setattr(kernels, "availability", lambda: options)  # (a GPU machine with apex and TE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert kernels._choose("layernorm", "auto") == ("te", "auto on gpu")
    assert kernels._choose("layernorm", "auto", compiled=True) == ("torch", "auto on gpu, compiled layers")
    assert kernels._choose("layernorm", "te", compiled=True) == ("te", "requested")


def test_an_unavailable_kernel_ends_a_run_in_one_line(single_process, tmp_path):
    """A kernel asked for that this machine lacks is a config error naming the key (a 25-line traceback before)."""
    from training.train import main

    with pytest.raises(SystemExit) as exit:
        main(["--config", "configs/train/debug.yaml", "--run-dir", str(tmp_path / "run"), "--set",
              "kernels.layernorm=apex", "train.steps=1"])
    assert str(exit.value.code).startswith("config error: kernels.layernorm='apex' is not available: "), exit.value.code


def test_math_attention_draws_the_dropout_sdpa_draws():
    """The explicit softmax(QK^T)V applies its dropout_p as SDPA's CPU kernel does: the same output under the same
    seed (torch's generator), not the output without dropout."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    outs = []
    for attention in (sdpa_attention, math_attention):
        torch.manual_seed(1)
        outs.append(attention(q, k, v, causal=True, dropout_p=0.3))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(outs[1], math_attention(q, k, v, causal=True))  # (the dropout acts)


def test_each_named_choice_maps_to_its_implementation():
    """Kernels' accessors hand out the implementation each operation's choice names, fused or plain, and build
    the layer norm and optimizer with the arguments asked for (eps; AdamW's fused or foreach path)."""
    from model_parallel.cross_entropy import plain_cross_entropy
    from model_parallel.kernels import Kernels
    from model_parallel.keyed_dropout import compiled_keep_mask, keyed_keep_mask

    def kernels(**names):
        return Kernels({op: (names.get(op, "plain"), "requested") for op in KERNEL_CHOICES})

    fused = kernels(attention="math", bias_gelu="fused", bias_dropout_add="fused", split_heads="fused",
                    cross_entropy="fused", dropout_mask="compiled")
    assert fused.attention is math_attention and fused.bias_gelu is fused_bias_gelu
    assert fused.bias_dropout_add is fused_bias_dropout_add() and fused.split_heads is fused_split_heads
    assert fused.cross_entropy is fused_cross_entropy and fused.keep_mask is compiled_keep_mask()
    plain = kernels(attention="sdpa", dropout_mask="eager")
    assert plain.attention is sdpa_attention and plain.bias_gelu is plain_bias_gelu
    assert plain.bias_dropout_add is plain_bias_dropout_add and plain.split_heads is plain_split_heads
    assert plain.cross_entropy is plain_cross_entropy and plain.keep_mask is keyed_keep_mask
    norm = kernels(layernorm="torch").layer_norm(8, 1e-3)
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-3
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert kernels(optimizer="torch_fused").optimizer(p, lr=1e-3).defaults["fused"] is True
    assert kernels(optimizer="torch").optimizer(p, lr=1e-3).defaults["foreach"] is True


def test_auto_on_a_gpu_with_everything_available_takes_the_fused_kernels(monkeypatch):
    """A GPU machine with apex, Transformer Engine, Triton and compilers: `auto` takes TE's layer norm (torch's
    under kernels.compile, through select_kernels), every fused and compiled kernel, torch's fused AdamW."""
    import model_parallel.kernels as kernels

    options = {op: dict.fromkeys(names, None) for op, names in kernels.availability().items()}
    monkeypatch.setattr(kernels, "availability", lambda: options)
    monkeypatch.setattr(kernels, "compile_unavailable", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    expected = {"layernorm": "te", "attention": "sdpa", "bias_gelu": "fused", "bias_dropout_add": "fused",
                "split_heads": "fused", "cross_entropy": "fused", "optimizer": "torch_fused",
                "dropout_mask": "compiled"}
    chosen = select_kernels()
    assert chosen.choices == {op: (name, "auto on gpu") for op, name in expected.items()}
    assert chosen.summary().endswith("; layers eager (kernels.compile)")
    compiled = select_kernels(KernelConfig(compile=True))
    assert compiled.choices["layernorm"] == ("torch", "auto on gpu, compiled layers")
    assert compiled.summary().endswith("; layers compiled (kernels.compile)")


def test_deepspeed_adam_needs_a_gpu_nvcc_and_ninja(monkeypatch, tmp_path):
    """DeepSpeed's FusedAdam is built at first use: refused without a GPU even where nvcc and ninja are there, and
    on a GPU machine with nvcc, refused without ninja and available with it."""
    import shutil

    import torch.utils._triton
    import torch.utils.cpp_extension

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").touch()
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert availability()["optimizer"]["deepspeed"] == "needs a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert availability()["optimizer"]["deepspeed"] is None
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert availability()["optimizer"]["deepspeed"] == "DeepSpeed builds FusedAdam at first use and needs ninja"


def test_compilers_named_by_cc_and_cxx_count(monkeypatch):
    """compile_unavailable finds the compiler $CC (GPU: Triton's launcher) or $CXX (CPU: inductor) names when none
    of the usual names is on PATH, and the usual names without them."""
    import shutil

    import torch.utils._triton

    from model_parallel.kernels import _has, compile_unavailable

    monkeypatch.setenv("CC", "my-cc")
    monkeypatch.setenv("CXX", "my-c++")
    monkeypatch.setattr(shutil, "which", lambda name: "/opt/bin/" + name if name.startswith("my-") else None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert compile_unavailable() is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    assert compile_unavailable() is None
    monkeypatch.delenv("CXX")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for usual in ("g++", "c++", "clang++"):
        monkeypatch.setattr(shutil, "which", lambda name, usual=usual: "/usr/bin/" + name if name == usual else None)
        assert compile_unavailable() is None, usual
    assert _has("torch") and not _has("no_such_package_here") and not _has("no_such_package_here.sub")
