"""Correlated randomness for 3-party replicated sharing: an AES-128-CTR PRF and pairwise keys.

Keys (docs/protocols.md §2). Server P_i samples a 16-byte key k_i and sends it to its predecessor
P_{i-1} once, at setup; afterwards P_i holds (k_i, k_{i+1}) -- the same index pattern as its
shares (x_i, x_{i+1}). Key k_j is therefore known to exactly P_j and P_{j-1}, and F_{k_j} is a
value that the third party P_{j+1} cannot predict. Every server also holds a *common* key (known
to all three servers, public coins among them, never to the client) and a *private* key.

Sessions. The keys exchanged at setup are long-term master keys; every session (one query, one
test) derives its own AES keys as HMAC-SHA256(master, "siguard-prf/v1" | label | session_id)
truncated to 16 bytes, so streams never repeat across sessions although the counters restart.

Draws and the synchronisation invariant. Each derived key owns one AES-CTR keystream, read
sequentially (the counter block starts at 0 and the keystream position is the key's draw
counter). **Both holders of a key obtain the same words as long as they make the same draws
(same sizes, same order) from that key.** A party never draws from a key it does not hold,
so the invariant is per key: the protocol code in :mod:`siguard.runtime.mpc.rss` is written so that every
draw from k_j happens at both P_j and P_{j-1}, in the same position of the protocol. A
mismatched draw does not crash: the shares simply fail to cancel (tested in test_prg.py).
No (key, counter) pair is ever used twice, because the stream is only read forward.

Only ``os.urandom``/``secrets`` and AES from ``cryptography`` produce randomness here; numpy's and
torch's generators are never used for shares or masks.

Words are numpy int64 arrays (the keystream read as little-endian int64, so every host draws the same
words); this module does not import torch, so the networked query client draws its input shares with it
without loading torch. The servers' engine wraps the words as tensors (``torch.from_numpy``, no copy).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sys

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .transport import Transport

__all__ = [
    "KEY_BYTES",
    "new_key",
    "derive_key",
    "WordStream",
    "PartyKeys",
    "Randomness",
    "setup_keys",
]

KEY_BYTES = 16
_LABEL = b"siguard-prf/v1"


def new_key() -> bytes:
    """A fresh uniformly random 16-byte key from the operating system's CSPRNG."""
    return secrets.token_bytes(KEY_BYTES)


def derive_key(master: bytes, label: str, session_id: str | bytes) -> bytes:
    """HMAC-SHA256(master, "siguard-prf/v1" | label | 0x00 | session_id) truncated to 16 bytes."""
    sid = session_id.encode() if isinstance(session_id, str) else bytes(session_id)
    return hmac.new(master, _LABEL + label.encode() + b"\x00" + sid, hashlib.sha256).digest()[:KEY_BYTES]


_NATIVE_LE = sys.byteorder == "little"
_PIECE = 1 << 17  # words encrypted per AES call (1 MiB)
_ZERO_PLAIN = memoryview(bytes(8 * _PIECE))  # the keystream is the encryption of zeros
_EMPTY = np.empty(0, dtype=np.int64)


class WordStream:
    """One AES-128-CTR keystream read forward as int64 words; ``drawn`` counts the words read.

    ``take(n)`` returns keystream words [drawn, drawn + n) whatever the buffering, so two
    objects built from the same key return identical words for identical sequences of draws.
    Small draws are served from a pre-generated chunk (one AES call per chunk instead of per
    draw: the protocols draw a few words per round). A chunk of 16 Ki words: with 4 Ki, a quarter of
    the guard's draws (about a thousand words each) straddled two chunks and were copied together;
    the AES work per word is the same whatever the chunk. The keystream is written straight into a
    fresh buffer (``update_into``), viewed as a numpy int64 array, and handed out as zero-copy
    slices: a chunk is never written again once generated, and no word is handed out twice.
    """

    __slots__ = ("_enc", "_buf", "_pos", "drawn")

    CHUNK = 1 << 14  # words (128 KiB: a draw rarely straddles two chunks)

    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError(f"PRF keys are {KEY_BYTES} bytes, got {len(key)}")
        self._enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        self._buf = _EMPTY
        self._pos = 0
        self.drawn = 0

    def _generate(self, n: int, prefix: np.ndarray = _EMPTY) -> np.ndarray:
        """``prefix`` followed by the next n keystream words, as a fresh, writable native int64 array
        (the keystream is written in place after the copied prefix: no second copy of a big draw)."""
        m = len(prefix)
        out = np.empty(m + n + 2, dtype=np.int64)  # update_into wants room for one block beyond the data
        out[:m] = prefix
        buf = memoryview(out).cast("B")
        done = 0
        while done < n:
            k = min(n - done, _PIECE)
            if self._enc.update_into(_ZERO_PLAIN[: 8 * k], buf[8 * (m + done) :]) != 8 * k:
                raise RuntimeError("AES-CTR produced a short keystream")  # never hand out unwritten memory
            done += k
        if not _NATIVE_LE:
            out[m : m + n] = out[m : m + n].view("<i8").astype(np.int64)
        return out[: m + n]

    def take(self, n: int) -> np.ndarray:
        """The next n words as a 1-D numpy int64 array: a view into a chunk, or fresh. The words are
        never handed out again, so the caller may overwrite them (nothing else reads them)."""
        pos = self._pos
        end = pos + n
        self.drawn += n
        if end <= len(self._buf):
            self._pos = end
            return self._buf[pos:end]
        rest = self._buf[pos:]
        need = end - len(self._buf)
        if need <= self.CHUNK:
            self._buf, self._pos = self._generate(self.CHUNK), need
            fresh = self._buf[:need]
            return np.concatenate((rest, fresh)) if len(rest) else fresh
        self._buf, self._pos = _EMPTY, 0
        return self._generate(need, rest)


class PartyKeys:
    """The long-term keys of one party.

    For a server P_i: ``own`` = k_i (shared with P_{i-1}), ``next_key`` = k_{i+1} (shared with P_{i+1}),
    ``common`` (all three servers) and ``private``. The client (party 3) has only ``private``.
    """

    def __init__(
        self,
        party: int,
        own: bytes | None = None,
        next_key: bytes | None = None,
        common: bytes | None = None,
        private: bytes | None = None,
    ):
        self.party = party
        self.own = own
        self.next_key = next_key
        self.common = common
        self.private = private if private is not None else new_key()

    def session(self, session_id: str | bytes) -> Randomness:
        """Fresh per-session PRF streams (all draw counters at 0).

        ``session_id`` must be the same at the three servers and must never repeat for the same
        keys: a repeated id replays every mask of the earlier session."""
        return Randomness(self, session_id)


class Randomness:
    """Per-session PRF streams of party i: F_{k_i}, F_{k_{i+1}}, the common and the private stream.

    Draw methods take a word count n and return 1-D numpy int64 arrays of n words (the caller reshapes,
    and wraps them as tensors where it computes on tensors). See the module docstring for the invariant
    that keeps the two holders of each key in step.
    """

    def __init__(self, keys: PartyKeys, session_id: str | bytes):
        self.party = keys.party
        i = keys.party
        self._streams: dict[int, WordStream] = {}
        if keys.own is not None and keys.next_key is not None:
            # Label by key index j, so both holders of k_j derive the same session key.
            self._streams[i % 3] = WordStream(derive_key(keys.own, f"k{i % 3}", session_id))
            self._streams[(i + 1) % 3] = WordStream(derive_key(keys.next_key, f"k{(i + 1) % 3}", session_id))
        # F_{k_i}'s and F_{k_{i+1}}'s take, for the correlated draws (a few per round: no lookups)
        self._pair = (self._streams[i % 3].take, self._streams[(i + 1) % 3].take) if self._streams else None
        self._common = WordStream(derive_key(keys.common, "common", session_id)) if keys.common else None
        self._private = WordStream(derive_key(keys.private, f"private{i}", session_id))

    # ---- single streams ---------------------------------------------------------------------
    def holds(self, j: int) -> bool:
        """True iff this party holds k_j (j = i or i+1 mod 3)."""
        return j % 3 in self._streams

    def key_stream_np(self, j: int, n: int) -> np.ndarray:
        """n words of F_{k_j}, known to P_j and P_{j-1} only (raises if this party lacks k_j). Never handed
        out again: the caller may overwrite them (it may be a view of the stream's chunk)."""
        try:
            stream = self._streams[j % 3]
        except KeyError:
            raise ValueError(f"party {self.party} does not hold key k{j % 3}") from None
        return stream.take(n)

    def common_np(self, n: int) -> np.ndarray:
        """n words known to all three servers (never to the client)."""
        if self._common is None:
            raise ValueError(f"party {self.party} has no common key")
        return self._common.take(n)

    def private_np(self, n: int) -> np.ndarray:
        """n words known to this party only."""
        return self._private.take(n)

    def drawn(self, j: int) -> int:
        """Number of words drawn so far from k_j (for checking the invariant in tests)."""
        return self._streams[j % 3].drawn

    # ---- correlated draws -------------------------------------------------------------------
    def pair_np(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(F_{k_i}, F_{k_{i+1}}), n words each: this party's two slots of a fresh random RSS sharing."""
        if self._pair is None:  # raises: this party holds no key pair
            return self.key_stream_np(self.party, n), self.key_stream_np(self.party + 1, n)
        own, nxt = self._pair
        return own(n), nxt(n)

    def zero_share_np(self, n: int) -> np.ndarray:
        """alpha_i = F_{k_i} - F_{k_{i+1}}, n words; the three parties' alphas sum to 0 mod 2^64 (the caller
        owns them)."""
        own, nxt = self.pair_np(n) if self._pair is None else (self._pair[0](n), self._pair[1](n))
        return np.subtract(own, nxt, out=own)  # own's words are consumed: reuse their memory

    def zero_share_xor_np(self, n: int) -> np.ndarray:
        """beta_i = F_{k_i} xor F_{k_{i+1}}, n words; the three parties' betas XOR to 0 (the caller owns them)."""
        own, nxt = self.pair_np(n) if self._pair is None else (self._pair[0](n), self._pair[1](n))
        return np.bitwise_xor(own, nxt, out=own)  # own's words are consumed: reuse their memory


def setup_keys(transport: Transport) -> PartyKeys:
    """Key agreement for server P_i (1 round, 48 B sent by each server, none by the client).

    P_i samples k_i and a common-key contribution c_i with the OS CSPRNG, sends (k_i, c_i) to
    P_{i-1} and c_i to P_{i+1}; the common key is SHA-256(c_0 | c_1 | c_2) truncated. The channel
    is assumed authenticated and private (TLS between hosts). Runs in the transport step "setup".
    """
    i = transport.party
    if i not in (0, 1, 2):
        raise ValueError("only the servers P0, P1, P2 take part in key setup")
    prev, nxt = (i - 1) % 3, (i + 1) % 3
    own, contribution = new_key(), new_key()

    def key_words(*keys: bytes) -> np.ndarray:
        # '<i8' pins the byte order, so hosts of either endianness exchange identical bytes
        return np.frombuffer(b"".join(keys), dtype="<i8").astype(np.int64)

    with transport.step("setup"):
        got = transport.exchange_words(
            {prev: key_words(own, contribution), nxt: key_words(contribution)},
            {nxt: (4,), prev: (2,)},
        )
    from_next = got[nxt].astype("<i8").tobytes()
    from_prev = got[prev].astype("<i8").tobytes()
    next_key, c_next = from_next[:KEY_BYTES], from_next[KEY_BYTES:]
    contributions = {i: contribution, nxt: c_next, prev: from_prev}
    common = hashlib.sha256(b"".join(contributions[j] for j in range(3))).digest()[:KEY_BYTES]
    return PartyKeys(i, own=own, next_key=next_key, common=common)
