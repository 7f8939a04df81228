"""Frozen-prefix cache: run the frozen bottom of the model once per distinct sample.

Options: ``frozen_prefix_cache: off|memory|disk`` (default ``off``), ``frozen_prefix_cache_dir``
and ``frozen_prefix_cache_max_gb``. While the weights below the lowest parameter the plan ever
trains do not change, their output for a sample does not change either: every epoch after the
first, and every run of a learning-rate sweep, recomputes it for nothing. With the cache,

* the **boundary** is the input of the lowest block that ever trains: decoder layer ``i`` (the
  lowest layer with a trainable parameter at any step, so gradual unfreezing and LISA are
  covered), else the final norm, else the head's input (the head alone trains);
* a **pre-pass** (in inference mode, with ``per_device_eval_batch_size``, a progress bar) runs
  the prefix once for every distinct training sample and keeps its hidden states at the boundary;
  evaluation samples, and anything the pre-pass did not see, are computed when first met;
* each forward then skips the prefix's layers (they return their input) and starts at the
  boundary from the cached states.

Entries are **content-addressed**: a sample's key is a hash of what reaches the model for it
(input ids, attention mask, position ids, token type ids, any other per-sample tensor), so
shuffling, new epochs, a resumed run and every DDP rank hit it. The cache as a whole is keyed by
a **fingerprint** of everything that shapes the prefix: the library, torch and transformers
versions, the model class and config, the attention implementation, the boundary, the device
type, fp16/bf16, and the bytes, dtypes and shapes of every prefix parameter and buffer. A cache
made with other weights, another boundary or another precision is never read.

**Padding.** Real tokens never attend to padding (the attention mask), so their states do not
depend on how much padding follows them: trailing padding is cut off before the key is taken and
the stored row, and refilled with zeros when the row is put back into a batch of any length. That
is exact as long as nothing reads the outputs at trailing padding positions, which is checked
per batch (token labels there are all -100; for sequence-level labels or none, the padding holds
``pad_token_id``, where a classification head's pooling looks for it); a batch that fails the
check keeps its padding in the key. Leading (left) padding is kept: without explicit
``position_ids`` it moves the real tokens' positions, so a left-padded sample hits only when it
arrives with the same padding (pad to a fixed length, or pad on the right, for full use).

Logits at padding positions are not the uncached model's (no loss reads them). Refused, before
training, where the result would change: dropout or NEFTune noise in the prefix, a collator or
dataset that changes a sample between epochs (random masking or cropping: the first batch is
collated twice), trainable embeddings or a plan whose layer 0 trains (LISA or gradual unfreezing
over every layer), DeepSpeed ZeRO, FSDP and ``torch_compile``; an unwritable cache directory and a
cache larger than ``frozen_prefix_cache_max_gb`` (with the figure).
"""

from .cache import FrozenPrefixCache, get_frozen_prefix_cache, remove_frozen_prefix_cache

__all__ = ["FrozenPrefixCache", "get_frozen_prefix_cache", "remove_frozen_prefix_cache"]
