"""utils.py: reading weights in threads, loading without PyTorch, GGUF files of each tensor type, the hub,
sampling."""

import glob
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import utils
from conftest import FP32_ATOL, ROOT, write_gguf

@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_loads_with_matching_logits(make_checkpoint, tmp_path, qtype):
    from gguf import GGMLQuantizationType

    folder, reference = make_checkpoint("llama")
    stored = write_gguf(tmp_path / "tiny.gguf", folder, reference, GGMLQuantizationType[qtype])
    model, tokenizer, config = utils.load(str(tmp_path / "tiny.gguf"))
    assert config["num_key_value_heads"] == 2 and not config["tie_word_embeddings"]
    quantized = qtype.startswith("Q")
    assert ("scales" in model.layers[0].self_attn.q_proj) == quantized  # quantized tensors stay quantized

    # the reference computes with the weights as stored in the file, dequantized
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in stored.items()})
    tokens = tokenizer.encode("Q: the team when year is 7\nA: SELECT team FROM t WHERE year = 7")
    assert len(tokens) > 10  # the tokenizer came from the file's metadata
    with torch.no_grad():
        expected = reference(torch.tensor([tokens])).logits.numpy()
    assert np.abs(np.array(model(mx.array([tokens]))) - expected).max() <= FP32_ATOL


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(utils.UserError, match="GGUF architecture 'falcon' is not supported"):
        utils.load(str(tmp_path / "m.gguf"))


def test_hub_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(utils.UserError, match=r"cannot fetch 'some-org/some-model' from the Hugging Face hub"):
        utils.load("some-org/some-model")
    with pytest.raises(utils.UserError, match="no such file or folder"):
        utils.load("./not/here")


def test_bounded_stops_a_block_that_runs_away():
    """utils.bounded, which chat templates render under: a block past its memory, or past its time, stops with an
    error raised inside it."""
    with pytest.raises(MemoryError):
        with utils.bounded(2, 2**24):
            pieces = []
            while True:
                pieces.append("x" * 4096)
    with pytest.raises(TimeoutError):
        with utils.bounded(0.1, 2**30):
            while True:
                pass


def test_sampling():
    logits = mx.log(mx.array([[0.05, 0.6, 0.3, 0.05]]))
    assert utils.sample(logits, temp=0, top_p=1.0).item() == 1
    mx.random.seed(0)
    nucleus = [utils.sample(logits, temp=1.0, top_p=0.8).item() for _ in range(200)]
    assert set(nucleus) == {1, 2}  # 0.6 + 0.3 reach 0.8; the tail is never drawn
    everything = [utils.sample(logits, temp=1.0, top_p=1.0).item() for _ in range(400)]
    assert set(everything) == {0, 1, 2, 3}


def test_blas_choice(monkeypatch):
    """OpenBLAS on AMD processors, MKL elsewhere; OpenBLAS told the processor's kernels where it would pick
    ones from before AVX2 (as Debian 12's did on a Sapphire Rapids), left alone where it picks right or
    OPENBLAS_CORETYPE is set."""
    import ctypes

    found = {"mkl": "libmkl_rt.so.3", "openblas": "libblas.so.3"}
    monkeypatch.delenv("LORA_BLAS", raising=False)
    for vendor, flags, picked, blas, settings in [
            ("GenuineIntel", {"avx2", "avx512bw"}, "Prescott", "mkl", {"OPENBLAS_CORETYPE": "SkylakeX"}),
            ("AuthenticAMD", {"avx2", "avx512bw", "avx512_bf16"}, "Cooperlake", "openblas", {}),
            ("AuthenticAMD", {"avx2"}, "Nehalem", "openblas", {"OPENBLAS_CORETYPE": "Haswell"}),
            ("GenuineIntel", {"sse3"}, "Prescott", "mkl", {})]:
        monkeypatch.setattr(utils, "cpu_info", lambda: (vendor, flags))
        monkeypatch.setattr(ctypes, "CDLL", lambda path: type("Lib", (), {
            "openblas_get_corename": type("Fn", (), {"__call__": lambda self: picked.encode()})()})())
        monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
        assert utils.preferred_blas(found) == blas
        assert utils.blas_settings("openblas", found["openblas"]) == settings
        monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
        assert utils.blas_settings("openblas", found["openblas"]) == {}
    assert utils.preferred_blas({"openblas": "libblas.so.3"}) == "openblas"
    monkeypatch.setenv("LORA_BLAS", "none")
    assert utils.preferred_blas(found) is None


@pytest.mark.skipif(importlib.util.find_spec("scipy_openblas32") is None or shutil.which("cc") is None
                    or glob.glob("/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"),
                    reason="pip's OpenBLAS (scipy-openblas32) or a C compiler missing, or Debian's OpenBLAS first")
def test_pips_openblas_serves_mlxs_products(tmp_path):
    """pip's OpenBLAS prefixes its names: the library pip_openblas builds (into the cache, once, and again if the
    copy there is damaged) gives them back, so that in a process that chose OpenBLAS the names MLX and its LAPACK
    call are that library's, and MLX's product and singular values are numpy's."""
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), LORA_BLAS="openblas")
    for key in ("LORA_CPU_ENVIRONMENT", "LD_PRELOAD"):
        env.pop(key, None)
    code = ("import ctypes, os, numpy as np, utils; utils.set_up_process(); import mlx.core as mx\n"
            "preloaded = os.environ['LD_PRELOAD'].split()[0]\n"
            "def address(lib, name): return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value\n"
            "ours = all(address(ctypes.CDLL(None), n) == address(ctypes.CDLL(preloaded), n)\n"
            "           for n in ('cblas_sgemm', 'sgemm_', 'sgesdd_'))\n"
            "a, b = np.random.rand(3, 64, 96).astype(np.float32), np.random.rand(96, 80).astype(np.float32)\n"
            "product = np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)\n"
            "values = np.array(mx.linalg.svd(mx.array(b), compute_uv=False, stream=mx.cpu))\n"
            "svd = np.allclose(values, np.linalg.svd(b, compute_uv=False), rtol=1e-4, atol=1e-4)\n"
            "print(os.environ['LORA_CPU_ENVIRONMENT'], preloaded, ours, product, svd)")
    for run in range(3):  # built, then found built, then built again in place of a damaged copy
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        name, preloaded, *checks = out.stdout.split()
        assert (name, checks) == ("openblas", ["True", "True", "True"])
        assert Path(preloaded).parent == tmp_path / "lora-mlx" and Path(preloaded).exists()
        assert list((tmp_path / "lora-mlx").iterdir()) == [Path(preloaded)]  # one build, nothing left over
        if run == 1:
            Path(preloaded).write_bytes(Path(preloaded).read_bytes()[:1000])


def test_weights_read_in_threads_are_mx_load_s(tiny_llama, tmp_path):
    """However the arrays of one file or of several are split over threads, each is read as mx.load reads it,
    converted; with `names`, those alone are read."""
    weights = mx.load(str(tiny_llama / "model.safetensors"))
    names = sorted(weights)
    shards = [str(tmp_path / f"part{i}.safetensors") for i in range(3)]
    for i, shard in enumerate(shards):
        mx.save_safetensors(shard, {k: weights[k] for k in names[i::3]})

    def to_bf16(arrays):
        return {k: v.astype(mx.bfloat16) for k, v in arrays.items()}

    for files in ([str(tiny_llama / "model.safetensors")], shards):
        for threads in (1, 3, 16):
            read = utils.read_in_threads(files, to_bf16, threads=threads)
            assert sorted(read) == names
            for k in names:
                assert read[k].dtype == mx.bfloat16 and mx.array_equal(read[k], weights[k].astype(mx.bfloat16)), k
    some = set(names[::5])
    assert sorted(utils.read_in_threads(shards, lambda arrays: arrays, some)) == sorted(some)


def test_scripts_load_models_without_pytorch(tiny_llama):
    """transformers imports PyTorch where it is installed, as here, which took seconds on a GPU server: the
    scripts' set-up hides it, and the tokenizer is the same without it, with no advice printed about it."""
    code = ("import sys, utils; utils.set_up_process(); _, tokenizer, _ = utils.load(sys.argv[1]); "
            "print(sys.modules['torch'] is None, 'transformers' in sys.modules, tokenizer.encode('SELECT a FROM t'))")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_llama)], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    hidden, imported, ids = run.stdout.strip().split(" ", 2)
    assert hidden == imported == "True"
    assert ids == str(utils.load(str(tiny_llama))[1].encode("SELECT a FROM t"))
    assert "PyTorch" not in run.stderr


def test_first_not_finite():
    """A sum per array finds a NaN or Inf; a sum that only overflows is no finding; a one-value bound may be
    infinite (Gemma 4's encoders clip to ±Inf), not NaN."""
    inf, nan = float("inf"), float("nan")
    assert utils.first_not_finite({"big": mx.full((1000,), 3e38), "ints": mx.array([1, 2])}) is None
    assert utils.first_not_finite({"bound": mx.array([-inf]), "weight": mx.array([1.0, inf])}) == "weight"
    assert utils.first_not_finite({"bound": mx.array(nan)}) == "bound"
    with pytest.raises(utils.UserError, match=r"^x.gguf: tensor w holds NaN$"):
        utils.check_finite({"w": mx.array([1.0, nan, inf])}, "x.gguf")
