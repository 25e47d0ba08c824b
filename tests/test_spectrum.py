"""Tests of the batched Gram eigensolver: eigenvalues equal float64 SVD (numpy), shape
buckets keep the order, precision rules, clamping and no autograd."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from tempbalance.spectrum import compute_dtype, gram_eigenvalues, iter_pooled_spectra, pooled_spectra


def svd_sq(m: torch.Tensor) -> np.ndarray:
    return np.sort(np.linalg.svd(m.detach().double().numpy(), compute_uv=False) ** 2)


@pytest.mark.parametrize("shape", [(3, 5, 8), (2, 9, 4), (1, 6, 6), (4, 1, 7)])
def test_gram_eigenvalues_equal_svd(shape):
    torch.manual_seed(0)
    mats = torch.randn(*shape, dtype=torch.float64)
    eigs = gram_eigenvalues(mats)
    assert eigs.shape == (shape[0], min(shape[1:]))
    for b in range(shape[0]):
        np.testing.assert_allclose(eigs[b].numpy(), svd_sq(mats[b]), rtol=1e-10, atol=1e-12)


def test_gram_eigenvalues_rejects_non_stack():
    with pytest.raises(ValueError, match=r"\(batch, m, n\)"):
        gram_eigenvalues(torch.randn(4, 4))


def test_pooled_spectra_buckets_keep_order_and_pool():
    torch.manual_seed(1)
    stacks = [
        torch.randn(9, 8, 6),
        torch.randn(1, 20, 8),
        torch.randn(2, 6, 8),  # same bucket as the first (transposed)
        torch.randn(1, 8, 20),  # same bucket as the second
        torch.randn(3, 5, 5),
    ]
    spectra = pooled_spectra(stacks, "float64")
    for stack, eigs in zip(stacks, spectra):
        assert eigs.dtype == torch.float64
        assert eigs.numel() == stack.shape[0] * min(stack.shape[1:])
        assert bool((eigs[1:] >= eigs[:-1]).all())
        ref = np.sort(np.concatenate([svd_sq(m) for m in stack]))
        np.testing.assert_allclose(eigs.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_iter_pooled_spectra_yields_every_index_once():
    stacks = [torch.randn(1, 4, 4), torch.randn(1, 3, 5), torch.randn(2, 4, 4)]
    seen = []
    for indices, spectra in iter_pooled_spectra(stacks):
        assert len(indices) == len(spectra)
        seen.extend(indices)
    assert sorted(seen) == [0, 1, 2]


@pytest.mark.parametrize(
    "weight_dtype,precision,expected",
    [
        (torch.float16, "auto", torch.float32),
        (torch.bfloat16, "auto", torch.float32),
        (torch.float32, "auto", torch.float32),
        (torch.float64, "auto", torch.float64),
        (torch.float32, "float64", torch.float64),
        (torch.float64, "float32", torch.float32),
    ],
)
def test_compute_dtype(weight_dtype, precision, expected):
    assert compute_dtype(weight_dtype, precision) == expected


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="precision='half'"):
        compute_dtype(torch.float32, "half")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_is_upcast(dtype):
    torch.manual_seed(2)
    mats = torch.randn(2, 16, 24).to(dtype)
    eigs = pooled_spectra([mats])[0]
    ref = np.sort(np.concatenate([svd_sq(m.float()) for m in mats]))
    np.testing.assert_allclose(eigs.numpy(), ref, rtol=1e-4, atol=1e-5 * ref.max())


def test_rank_deficient_eigenvalues_are_clamped_non_negative():
    torch.manual_seed(3)
    low_rank = (torch.randn(64, 2) @ torch.randn(2, 64)).unsqueeze(0)
    eigs = pooled_spectra([low_rank], "float32")[0]
    assert bool((eigs >= 0).all())
    np.testing.assert_allclose(eigs[-2:].numpy(), svd_sq(low_rank[0])[-2:], rtol=1e-4)


def test_no_autograd_graph_and_input_untouched():
    mats = torch.randn(2, 5, 7, requires_grad=True)
    before = mats.detach().clone()
    eigs = pooled_spectra([mats])[0]
    assert eigs.grad_fn is None and not eigs.requires_grad
    assert torch.equal(mats.detach(), before)
    assert torch.is_grad_enabled()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_stack_gets_none_and_others_are_solved(bad):
    torch.manual_seed(4)
    good, broken, other = torch.randn(3, 6, 9), torch.randn(2, 6, 9), torch.randn(1, 9, 6)
    broken[1, 2, 3] = bad
    spectra = pooled_spectra([good, broken, other], "float64")
    assert spectra[1] is None
    ref = np.sort(np.concatenate([svd_sq(m) for m in good]))
    np.testing.assert_allclose(spectra[0].numpy(), ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(spectra[2].numpy(), svd_sq(other[0]), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("side", [1, 100, 128, 129, 256, 300, 600, 1100])
def test_blocked_gram_lower_triangle_equals_full_product(side):
    from tempbalance.spectrum import gram_lower_

    torch.manual_seed(side)
    mats = torch.randn(2, side, side + 7, dtype=torch.float64)
    out = torch.full((2, side, side), float("nan"), dtype=torch.float64)
    gram_lower_(mats, out)
    full = mats @ mats.transpose(1, 2)
    torch.testing.assert_close(torch.tril(out), torch.tril(full), rtol=1e-12, atol=1e-10)
    assert torch.isfinite(out).all()  # the skipped upper blocks are zeroed, not left as garbage
    eigs = gram_eigenvalues(mats)
    np.testing.assert_allclose(eigs[0].numpy(), svd_sq(mats[0]), rtol=1e-9, atol=1e-9)


def test_gram_product_keeps_no_reference_to_its_inputs():
    """Released by reference counting alone (a recursion through a closure would be a cycle that
    keeps every streamed weight alive until the garbage collector runs)."""
    from tempbalance.spectrum import gram_lower_

    mats, out = torch.randn(1, 600, 700), torch.empty(1, 600, 600)
    watched = [weakref.ref(mats), weakref.ref(out)]
    gc.disable()
    try:
        gram_lower_(mats, out)
        del mats, out
        assert [ref() for ref in watched] == [None, None]
    finally:
        gc.enable()


# ---------------------------------------------------------------- precision of the Gram products


def _precision_state() -> dict[str, object]:
    """Every float32-precision setting a user can read, through both APIs (a read that raises counts too)."""
    state: dict[str, object] = {}
    readers = {
        "matmul_precision": torch.get_float32_matmul_precision,
        "cuda.matmul.allow_tf32": lambda: torch.backends.cuda.matmul.allow_tf32,
        "cudnn.allow_tf32": lambda: torch.backends.cudnn.allow_tf32,
    }
    if hasattr(torch.backends.mkldnn, "matmul"):
        readers.update({
            "generic": lambda: torch.backends.fp32_precision,
            "cuda.matmul": lambda: torch.backends.cuda.matmul.fp32_precision,
            "mkldnn.matmul": lambda: torch.backends.mkldnn.matmul.fp32_precision,
            "cudnn.conv": lambda: torch.backends.cudnn.conv.fp32_precision,
        })
    for name, read in readers.items():
        try:
            state[name] = read()
        except RuntimeError as error:  # torch refuses a legacy read after a mix of the two APIs
            state[name] = f"raises {str(error)[:40]}"
    return state


@pytest.fixture
def user_precision():
    """Puts every setting back after the test, whatever the test set."""
    saved = {"matmul": torch.get_float32_matmul_precision(), "cublas": torch.backends.cuda.matmul.allow_tf32,
             "cudnn": torch.backends.cudnn.allow_tf32}
    new = None
    if hasattr(torch.backends.mkldnn, "matmul"):
        new = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
               torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    yield
    torch.set_float32_matmul_precision(saved["matmul"])
    torch.backends.cuda.matmul.allow_tf32 = saved["cublas"]
    torch.backends.cudnn.allow_tf32 = saved["cudnn"]
    if new is not None:
        (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision,
         torch.backends.mkldnn.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) = new


def _lowered(kind: str) -> None:
    """Turn float32 matmul precision down the way a GPU training script does."""
    if kind == "medium":
        torch.set_float32_matmul_precision("medium")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif kind == "new-api":
        if not hasattr(torch.backends.mkldnn, "matmul"):
            pytest.skip("torch < 2.9 has no per-backend fp32_precision")
        torch.backends.fp32_precision = "tf32"
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    else:
        raise AssertionError(kind)


def _wide_model() -> torch.nn.Module:
    """Large enough products (512-wide) that bf16 matrix units change float32 Gram results."""
    torch.manual_seed(11)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 512, 3), torch.nn.Conv2d(512, 512, 3),
        torch.nn.Linear(512, 600), torch.nn.Linear(600, 10),
    )


@pytest.mark.parametrize("kind", ["medium", "new-api"])
def test_alphas_do_not_depend_on_the_float32_matmul_setting(user_precision, kind):
    import tempbalance

    model = _wide_model()
    options = dict(precision="float32", keep_eigenvalues=True)
    default = tempbalance.analyze(model, **options)
    _lowered(kind)
    before = _precision_state()
    lowered = tempbalance.analyze(model, **options)
    assert _precision_state() == before  # the user's settings are back
    for a, b in zip(default, lowered):
        assert a.alpha == b.alpha, a.name  # bit-identical, not close
        assert np.array_equal(a.eigenvalues, b.eigenvalues), a.name


def test_scheduler_rates_do_not_depend_on_the_float32_matmul_setting(user_precision):
    import tempbalance

    def rates(lowered: bool) -> tuple[dict, list]:
        model = _wide_model()
        optimizer = torch.optim.SGD(tempbalance.param_groups(model), lr=0.1)
        if lowered:
            _lowered("medium")
        balancer = tempbalance.TempBalance(model, optimizer, precision="float32")
        balancer.rebalance()
        return dict(balancer.factors), [group["lr"] for group in optimizer.param_groups]

    assert rates(False) == rates(True)


def test_lowered_setting_really_changes_float32_products_here(user_precision):
    """Why the test above can fail: on a CPU with bf16 matrix units (AMX / AVX512-BF16) "medium"
    changes a float32 product of this size. Elsewhere this is skipped and the flag test below
    still checks what the products see."""
    torch.manual_seed(12)
    a = torch.randn(9, 512, 600)
    full = torch.matmul(a, a.transpose(1, 2))
    torch.set_float32_matmul_precision("medium")
    low = torch.matmul(a, a.transpose(1, 2))
    if torch.equal(full, low):
        pytest.skip("this CPU computes float32 products in full precision under 'medium'")
    with __import__("tempbalance.spectrum", fromlist=["x"]).full_float32_precision("cpu"):
        assert torch.equal(torch.matmul(a, a.transpose(1, 2)), full)


@pytest.mark.parametrize("per_backend", [True, False])
def test_products_and_solver_see_full_precision(user_precision, monkeypatch, per_backend):
    """Whatever the machine: inside the spectrum code every matmul and eigvalsh runs with the flags at
    full precision (torch's per-backend API, or the legacy one on torch < 2.9)."""
    import tempbalance.spectrum as spectrum

    if per_backend and not hasattr(torch.backends.mkldnn, "matmul"):
        pytest.skip("torch < 2.9")
    monkeypatch.setattr(spectrum, "_per_backend_flags", lambda: per_backend)
    torch.set_float32_matmul_precision("medium")
    seen = []

    def current() -> object:
        if per_backend:
            return torch.backends.mkldnn.matmul.fp32_precision
        return torch.get_float32_matmul_precision()

    def spy(real):
        def call(*args, **kwargs):
            seen.append(current())
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch, "matmul", spy(torch.matmul))
    monkeypatch.setattr(torch.linalg, "eigvalsh", spy(torch.linalg.eigvalsh))
    user = current()
    pooled_spectra([torch.randn(2, 300, 40), torch.randn(1, 20, 30)])
    gram_eigenvalues(torch.randn(3, 5, 7))
    full = "ieee" if per_backend else "highest"
    assert len(seen) >= 6 and set(seen) == {full}
    assert current() == user


def test_user_setting_restored_when_the_block_raises(user_precision):
    from tempbalance.spectrum import full_float32_precision

    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = False
    before = _precision_state()
    with pytest.raises(KeyError):
        with full_float32_precision("cpu"):
            with full_float32_precision("cpu"):  # nested: the outer exit restores
                raise KeyError("inside")
    assert _precision_state() == before
    with pytest.raises(torch.linalg.LinAlgError):
        with full_float32_precision("cuda"):  # only a flag: no device needed
            torch.linalg.cholesky(-torch.eye(3))  # a real solver error inside
    assert _precision_state() == before


def test_full_precision_is_safe_from_two_threads(user_precision):
    """The first thread in saves the user's value, the last out restores it (not the other's forced one)."""
    import threading

    from tempbalance.spectrum import full_float32_precision

    torch.set_float32_matmul_precision("medium")
    before = _precision_state()
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with full_float32_precision("cpu"):
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    with full_float32_precision("cpu"):
        pass  # leaves first: must not restore while the worker is inside
    assert _precision_state() != before
    release.set()
    thread.join(10)
    assert _precision_state() == before


# ---------------------------------------------------------------- eigensolver failures


def _fail_first_call(monkeypatch, error: Exception) -> list[torch.Tensor]:
    import tempbalance.spectrum as spectrum

    real = torch.linalg.eigvalsh
    calls: list[torch.Tensor] = []

    def flaky(gram, *args, **kwargs):
        calls.append(gram)
        if len(calls) == 1:
            raise error
        return real(gram, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", flaky)
    monkeypatch.setattr(spectrum, "_fallback_logged", False)
    return calls


@pytest.mark.parametrize(
    "error",
    [
        torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge because the input matrix is "
                                 "ill-conditioned or has too many repeated eigenvalues (error code: 7)."),
        RuntimeError("cusolver error: CUSOLVER_STATUS_EXECUTION_FAILED, when calling `cusolverDnXsyevd`"),
    ],
)
def test_solver_failure_retries_the_batch_on_cpu_in_float64(monkeypatch, caplog, error):
    import tempbalance

    torch.manual_seed(13)
    model = torch.nn.Sequential(torch.nn.Linear(30, 80), torch.nn.Linear(80, 80), torch.nn.Linear(80, 5))
    calls = _fail_first_call(monkeypatch, error)
    with caplog.at_level("DEBUG", logger="tempbalance.spectrum"):
        report = tempbalance.analyze(model, precision="float32",
                                     keep_eigenvalues=True)
    assert len(report) == 3 and all(r.reason is None for r in report)
    failed = calls[0]
    retried = [g for g in calls[1:] if g.dtype == torch.float64]
    assert failed.dtype == torch.float32 and len(retried) == 1 and retried[0].device.type == "cpu"
    assert retried[0].shape == failed.shape
    # the failed bucket's records hold float64 values: eigenvalues of a float64 SVD, to float64 round-off
    modules = dict(model.named_modules())
    for r in report:
        weight = modules[r.name].weight.detach().double().numpy()
        ref = np.sort(np.linalg.svd(weight, compute_uv=False) ** 2)
        error = np.max(np.abs(r.eigenvalues - ref)) / ref.max()
        if min(r.matrix_shape) == failed.shape[1]:  # the failed batch: float64 values
            assert error < 1e-13, r.name
        else:  # the others: still the float32 solve
            assert 1e-9 < error < 1e-5, r.name
        assert np.isfinite(r.alpha)
    warnings = [rec for rec in caplog.records if rec.levelname == "WARNING"]
    assert len(warnings) == 1 and "CPU in float64" in warnings[0].getMessage()


def test_solver_failure_is_logged_once_per_process(monkeypatch, caplog):
    import tempbalance.spectrum as spectrum

    real = torch.linalg.eigvalsh

    def failing_float32(gram, *args, **kwargs):
        if gram.dtype == torch.float32:
            raise torch.linalg.LinAlgError("failed to converge")
        return real(gram, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigvalsh", failing_float32)
    monkeypatch.setattr(spectrum, "_fallback_logged", False)
    mats = torch.randn(2, 6, 9)
    with caplog.at_level("WARNING", logger="tempbalance.spectrum"):
        first = pooled_spectra([mats, torch.randn(1, 4, 4)])
        again = gram_eigenvalues(mats)
    assert sum(rec.levelname == "WARNING" for rec in caplog.records) == 1
    ref = np.sort(np.concatenate([svd_sq(m) for m in mats]))
    np.testing.assert_allclose(first[0].numpy(), ref, rtol=1e-12, atol=1e-12)
    assert again.dtype == torch.float32  # gram_eigenvalues keeps the input's dtype
    np.testing.assert_allclose(np.sort(again.reshape(-1).numpy()), ref, rtol=1e-6)


def test_other_errors_are_not_swallowed(monkeypatch):
    import tempbalance.spectrum as spectrum

    def out_of_memory(gram, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.linalg, "eigvalsh", out_of_memory)
    monkeypatch.setattr(spectrum, "_fallback_logged", False)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        pooled_spectra([torch.randn(1, 4, 5)])
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda g: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access")))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pooled_spectra([torch.randn(1, 4, 5)])
    assert spectrum._fallback_logged is False


def test_non_finite_stack_still_none_after_a_solver_failure(monkeypatch):
    _fail_first_call(monkeypatch, torch.linalg.LinAlgError("failed to converge"))
    good, broken = torch.randn(2, 6, 9), torch.randn(1, 6, 9)
    broken[0, 1, 1] = float("nan")
    spectra = pooled_spectra([good, broken], "float32")
    assert spectra[1] is None
    ref = np.sort(np.concatenate([svd_sq(m) for m in good]))
    np.testing.assert_allclose(spectra[0].numpy(), ref, rtol=1e-12, atol=1e-12)
