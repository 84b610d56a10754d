"""Independent reference of llama.cpp's SentencePiece ("llama" vocabulary) tokenizer, in plain Python.

A line-by-line port of llama.cpp's `llm_tokenizer_spm_session` and `tokenizer_st_partition`
(src/llama-vocab.cpp), reading the vocabulary straight from a GGUF with the `gguf` package.
It does not import activeflow_jax: it is the oracle that the engine's `tokenizers`-based
tokenizer is compared with. Slow (a heap per text) but obviously faithful.

- The text is first split at the texts of control, user-defined and unknown tokens (with
  special parsing on), longest token text first, each occurrence left to right.
- Each remaining fragment: a space prefix if the vocabulary asks for one and the previous piece
  was special (or it is the first), spaces -> U+2581, then split into UTF-8 characters; all
  adjacent pairs whose concatenation is a token go into a max-heap by (score, leftmost); pop,
  merge if both sides are unchanged, push the two new neighbouring pairs; finally each symbol is
  its token, or re-segmented through the pair that made it, or its bytes as <0xXX> tokens.
"""
import heapq

import gguf

CONTROL, USER_DEFINED, UNKNOWN, BYTE = 3, 4, 2, 6


class ReferenceSPM:
    def __init__(self, gguf_path):
        reader = gguf.GGUFReader(str(gguf_path))
        f = reader.fields
        self.tokens = list(f["tokenizer.ggml.tokens"].contents())
        self.scores = [float(s) for s in f["tokenizer.ggml.scores"].contents()]
        self.types = [int(t) for t in f["tokenizer.ggml.token_type"].contents()]
        self.add_space_prefix = bool(f["tokenizer.ggml.add_space_prefix"].contents()) \
            if "tokenizer.ggml.add_space_prefix" in f else True
        self.token_to_id = {}
        for i, t in enumerate(self.tokens):
            self.token_to_id.setdefault(t, i)
        self.byte_ids = {int(t[3:5], 16): i for i, t in enumerate(self.tokens) if self.types[i] == BYTE}
        special = [i for i, t in enumerate(self.types) if t in (CONTROL, USER_DEFINED, UNKNOWN)]
        # std::sort by text length, longest first (the order among equal lengths does not change the result
        # for non-overlapping texts)
        self.special = sorted(special, key=lambda i: -len(self.tokens[i].encode()))

    def _partition(self, text):
        fragments = [("text", text)]
        for sid in self.special:
            needle = self.tokens[sid]
            if not needle:
                continue
            out = []
            for kind, value in fragments:
                if kind != "text" or needle not in value:
                    out.append((kind, value))
                    continue
                parts = value.split(needle)
                for j, part in enumerate(parts):
                    if part:
                        out.append(("text", part))
                    if j < len(parts) - 1:
                        out.append(("token", sid))
            fragments = out
        return fragments

    def _spm(self, text, output):
        data = text.encode("utf-8")
        symbols = []  # [start, length, prev, next]
        offs = 0
        while offs < len(data):
            first = data[offs]
            n = 1 if first < 0x80 else 2 if first >> 5 == 0x6 else 3 if first >> 4 == 0xE else 4
            n = min(n, len(data) - offs)
            symbols.append([offs, n, len(symbols) - 1, -1 if offs + n == len(data) else len(symbols) + 1])
            offs += n
        heap, rev_merge = [], {}

        def add_bigram(left, right):
            if left == -1 or right == -1:
                return
            piece = data[symbols[left][0]:symbols[left][0] + symbols[left][1] + symbols[right][1]]
            tid = self.token_to_id.get(piece.decode("utf-8", errors="surrogateescape"))
            if tid is None:
                return
            # std::priority_queue with comparator (l.score < r.score) || (equal && l.left > r.left):
            # the top is the highest score, then the smallest left index
            heapq.heappush(heap, (-self.scores[tid], left, right, len(piece)))
            rev_merge[piece] = (left, right)

        for i in range(1, len(symbols)):
            add_bigram(i - 1, i)
        while heap:
            _, left, right, size = heapq.heappop(heap)
            ls, rs = symbols[left], symbols[right]
            if ls[1] == 0 or rs[1] == 0 or ls[1] + rs[1] != size:
                continue
            ls[1] += rs[1]
            rs[1] = 0
            ls[3] = rs[3]
            if rs[3] >= 0:
                symbols[rs[3]][2] = left
            add_bigram(ls[2], left)
            add_bigram(left, ls[3])

        def resegment(sym):
            piece = data[sym[0]:sym[0] + sym[1]]
            tid = self.token_to_id.get(piece.decode("utf-8", errors="surrogateescape"))
            if tid is not None:
                output.append(tid)
                return
            if piece not in rev_merge:
                output.extend(self.byte_ids[b] for b in piece)
                return
            a, b = rev_merge[piece]
            resegment(symbols[a])
            resegment(symbols[b])

        i = 0 if symbols else -1
        while i != -1:
            resegment(symbols[i])
            i = symbols[i][3]

    def encode(self, text):
        """Ids of text without BOS (llama_tokenize with add_special=False, parse_special=True)."""
        output, prev_special = [], True
        if not text:  # llama.cpp tokenizes nothing (no space prefix either) for an empty text
            return output
        for kind, value in self._partition(text):
            if kind == "token":
                output.append(value)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                value = " " + value
            self._spm(value.replace(" ", "\u2581"), output)
            prev_special = False
        return output
