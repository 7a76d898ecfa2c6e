"""strata.load from safetensors checkpoints made locally: exact tokens, bounded memory, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf

import strata
from strata import OffloadError
from tiny_models import VOCAB, greedy, make

IDS = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ("llama", "qwen2", "gpt2"):
        d = tmp_path_factory.mktemp(arch)
        make(arch, layers=4, seed=11).save_pretrained(d)
        out[arch] = d
    d = tmp_path_factory.mktemp("sharded")
    make("llama", layers=4, seed=12).save_pretrained(d, max_shard_size="150KB")
    assert (d / "model.safetensors.index.json").is_file() and len(list(d.glob("*.safetensors"))) > 2
    out["sharded"] = d
    return out


def reference(path):
    return greedy(tf.AutoModelForCausalLM.from_pretrained(path).eval(), IDS)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gpt2", "sharded"])
@pytest.mark.parametrize("mode", ["stream", "budget", "file_backed", "static", "static_file_backed"])
def test_greedy_tokens_equal_from_pretrained_in_every_placement_mode(checkpoints, name, mode):
    path = checkpoints[name]
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    kwargs = {"stream": {}, "budget": {"gpu_budget": int(0.85 * size)},
              "file_backed": {"file_backed": True, "cpu_cache": "200KiB"}, "static": {"static": True},
              "static_file_backed": {"static": True, "file_backed": True, "cpu_cache": "4MiB"}}[mode]
    model = strata.load(path, device="cpu", progress=False, **kwargs)
    handle = strata.handle_of(model)
    assert greedy(model, IDS) == reference(path)
    stats = handle.stats()
    assert stats["offloaded_blocks"] > 0 and stats["copies"] > 0
    if mode == "budget":
        assert 0 < stats["resident_blocks"] < 4
    assert stats.get("static", False) == mode.startswith("static")
    if mode == "file_backed":
        tiers = handle.store.stats()["tiers"]
        assert tiers["ranges"]["hits"] > 0 and tiers["cpu"]["bytes"] <= 200 << 10
    assert "streamed from the store" in handle.placement()
    handle.detach()
    assert greedy(model, IDS) == reference(path)  # a plain model afterwards


@pytest.mark.parametrize("mode", ["stream", "file_backed"])
def test_a_loaded_model_saved_with_save_pretrained_loads_back_with_its_weights(checkpoints, tmp_path, mode):
    """save_pretrained reads state_dict(): of a streamed block that was its NaN placeholders, so the
    saved checkpoint held NaN for every streamed weight and no error said so."""
    path = checkpoints["sharded"]
    kwargs = {"file_backed": True, "cpu_cache": "200KiB"} if mode == "file_backed" else {}
    model = strata.load(path, device="cpu", progress=False, **kwargs)
    model.save_pretrained(tmp_path / "saved")
    strata.handle_of(model).detach()
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    want = tf.AutoModelForCausalLM.from_pretrained(path).state_dict()
    got = again.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert greedy(again, IDS) == reference(path)


def test_file_backed_blocks_beyond_the_cpu_cache_are_read_from_the_files_without_a_refusal(checkpoints, caplog):
    """With ``file_backed`` and a ``cpu_cache`` smaller than the streamed blocks, the blocks that
    fit stay in the CPU tier and the others are read from the checkpoint's files on every pass:
    their copy into the full CPU tier (a promotion) is turned down, which is no refused put. It
    was counted in ``rejected`` and warned about ("tier cpu refused a put") as passes went on."""
    path = checkpoints["llama"]
    model = strata.load(path, device="cpu", file_backed=True, cpu_cache="200KiB", progress=False)
    handle = strata.handle_of(model)
    with caplog.at_level("WARNING", logger="strata"):
        with torch.no_grad():
            for _ in range(3):
                model(IDS)
    tiers = handle.store.stats()["tiers"]
    assert tiers["cpu"]["hits"] > 0 and tiers["ranges"]["hits"] > 0  # some blocks cached, some read each pass
    assert tiers["cpu"]["rejected"] == 0
    assert "refused a put" not in caplog.text
    handle.detach()


@pytest.mark.parametrize("rewrite", ["other-weights", "shifted-offsets"])
def test_a_file_backed_checkpoint_rewritten_under_the_model_is_refused_not_streamed(checkpoints, tmp_path, rewrite):
    # Before: the ranges tier read the files at the offsets taken at load, whatever the files were by then:
    # a checkpoint saved again over itself (another model's weights, or the same ones behind a longer
    # header) streamed other weights or bytes from the wrong offsets into the blocks, without a word.
    from safetensors.torch import load_file, save_file

    path = copy_ckpt(checkpoints["llama"], tmp_path / "ckpt")
    model = strata.load(path, device="cpu", file_backed=True, cpu_cache="200KiB", progress=False)
    handle = strata.handle_of(model)
    assert greedy(model, IDS) == reference(checkpoints["llama"])
    weights = load_file(path / "model.safetensors")
    if rewrite == "other-weights":
        weights = {name: t + 1 if t.is_floating_point() else t for name, t in weights.items()}
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    else:
        save_file(weights, path / "model.safetensors", metadata={"format": "pt", "note": "x" * 100})
    with pytest.raises(OffloadError, match=r"block model.layers.\d: its weights are not in the store any more"):
        greedy(model, IDS)
    assert handle.store.stats()["tiers"]["ranges"]["checksum_failures"] >= 1
    handle.store.close()  # detach() would refuse: blocks the store lost cannot be restored (close() warns)


@pytest.mark.parametrize("mode", ["stream", "static"])
def test_a_load_under_inference_mode_runs_and_detaches(checkpoints, mode):
    # Before: its placeholders were inference tensors; detach() failed ("Inference tensors do not track
    # version counter") halfway through putting the weights back.
    with torch.inference_mode():
        model = strata.load(checkpoints["llama"], device="cpu", progress=False, static=mode == "static")
        assert greedy(model, IDS) == reference(checkpoints["llama"])
    strata.handle_of(model).detach()
    assert greedy(model, IDS) == reference(checkpoints["llama"])


def test_loading_in_another_dtype_casts(checkpoints):
    model = strata.load(checkpoints["llama"], device="cpu", dtype=torch.bfloat16, progress=False)
    ref = tf.AutoModelForCausalLM.from_pretrained(checkpoints["llama"], dtype=torch.bfloat16).eval()
    assert next(model.parameters()).dtype == torch.bfloat16
    assert greedy(model, IDS) == greedy(ref, IDS)
    strata.handle_of(model).detach()


def test_dtype_auto_or_none_is_the_checkpoints_own_and_a_name_no_dtype_has_is_refused(tmp_path):
    # Before: "auto" and an unknown name ("fp32", "bf16") fell through to None and built float32 weights
    # without a word, as did None for a checkpoint whose config.json names no dtype.
    half = tmp_path / "half"
    make("llama", layers=2, seed=3).to(torch.float16).save_pretrained(half)
    bare = copy_ckpt(half, tmp_path / "bare")
    config = json.loads((bare / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (bare / "config.json").write_text(json.dumps(config))
    for path, dtype, want in [(half, "auto", torch.float16), (half, None, torch.float16), (bare, "auto", torch.float16),
                              (bare, None, torch.float16), (half, "bfloat16", torch.bfloat16),
                              (half, "torch.float32", torch.float32)]:
        model = strata.load(path, device="cpu", dtype=dtype, progress=False)
        assert {p.dtype for p in model.parameters()} == {want}, (path.name, dtype)
        strata.handle_of(model).detach()
    for bad, said in [("fp32", "'fp32'"), ("bf16", "'bf16'"), ("int8", "torch.int8")]:
        with pytest.raises(OffloadError, match=rf"dtype: got {said}; allowed: a floating dtype .* 'auto'"):
            strata.load(half, device="cpu", dtype=bad, progress=False)


def test_a_quantized_checkpoint_is_refused_not_cast_without_its_scales(tmp_path):
    # Before: an FP8 checkpoint (weights in float8 with per-block scales, config.json's quantization_config)
    # loaded without a word, its float8 weights cast to the model's dtype and the scales dropped: garbage.
    from safetensors.torch import load_file, save_file

    src = tmp_path / "plain"
    make("llama", layers=2, seed=4).to(torch.bfloat16).save_pretrained(src)
    fp8 = copy_ckpt(src, tmp_path / "fp8")
    weights = load_file(fp8 / "model.safetensors")
    for name in [n for n in weights if ".layers." in n and n.endswith("proj.weight")]:
        scale = weights[name].abs().max().float() / 448
        weights[name] = (weights[name].float() / scale).to(torch.float8_e4m3fn)
        weights[name + "_scale_inv"] = scale.reshape(1, 1)
    save_file(weights, fp8 / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (fp8 / "config.json").write_text(json.dumps(config))
    with pytest.raises(OffloadError, match=r"config.json: the checkpoint is quantized .*'fp8'.*from_pretrained, then "
                                           r"strata.offload\(model\)"):
        strata.load(fp8, device="cpu", progress=False)


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_checkpoints_are_refused_before_anything_is_placed(checkpoints, tmp_path):
    with pytest.raises(OffloadError, match="is not a directory"):
        strata.load(tmp_path / "nope", device="cpu")
    with pytest.raises(OffloadError, match=r"cpu_cache: got '1MiB'.*allowed: with file_backed=True and store=None"):
        strata.load(checkpoints["llama"], device="cpu", cpu_cache="1MiB")  # was ignored without a word
    d = copy_ckpt(checkpoints["sharded"], tmp_path / "missing")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (d / shard).unlink()
    with pytest.raises(OffloadError, match=f"shard {shard} named by the index is missing"):
        strata.load(d, device="cpu")

    d = copy_ckpt(checkpoints["sharded"], tmp_path / "truncated")
    with open(d / shard, "r+b") as f:
        f.truncate(os.path.getsize(d / shard) - 1000)
    with pytest.raises(OffloadError, match=f"shard {shard} is truncated or corrupt"):
        strata.load(d, device="cpu")

    d = copy_ckpt(checkpoints["sharded"], tmp_path / "index")
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(OffloadError, match=r"the index maps model.layers.9.mlp.up_proj.weight to .* which does not hold it"):
        strata.load(d, device="cpu")

    d = copy_ckpt(checkpoints["llama"], tmp_path / "arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-model"}))
    with pytest.raises(OffloadError, match="config.json: transformers .* cannot read it"):
        strata.load(d, device="cpu")

    d = copy_ckpt(checkpoints["llama"], tmp_path / "shape")
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(OffloadError, match=r"has shape \[128, 64\], the model expects \[96, 64\]"):
        strata.load(d, device="cpu")

    with pytest.raises(OffloadError, match=r"dtype: got torch.int8; allowed: a floating dtype"):
        strata.load(checkpoints["llama"], device="cpu", dtype=torch.int8)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(OffloadError, match="holds no \\*.safetensors files"):
        strata.load(tmp_path / "empty", device="cpu")


BIG = textwrap.dedent("""
    import sys, torch, strata, transformers
    def status(field):  # VmHWM is this process's own peak; ru_maxrss would include the forking parent's
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
    import transformers.models.llama.modeling_llama  # imported lazily by the load: not the load's memory
    path = sys.argv[1]
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    base = status("VmRSS")
    model = strata.load(path, device="cpu", file_backed=True, cpu_cache="16MiB", progress=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    peak = status("VmHWM")
    print(peak - base, strata.handle_of(model).store.stats()["tiers"]["cpu"]["bytes"])
""")


def test_file_backed_peak_host_memory_stays_bounded_for_a_much_larger_checkpoint(tmp_path):
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1536, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    bound = 80 << 20  # CPU tier 16 MiB + a ring of 2 blocks (2 x 13 MiB) + working memory
    assert size > 3 * bound
    out = subprocess.run([sys.executable, "-c", BIG, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    growth, cpu_tier_bytes = map(int, out.stdout.split()[-2:])
    assert cpu_tier_bytes <= 16 << 20
    assert growth < bound, f"peak RSS grew by {growth >> 20} MiB for a {size >> 20} MiB checkpoint"
