"""What every run of ``lmobj compare`` shares: the token store (prepared once under
``DIR/store`` unless ``--data`` names one) and its tokenizer."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from lmobjectives.config import build_config
from lmobjectives.errors import UserError

# A store compare prepares itself holds out 10% of the documents (not the 1% of a training
# store) so the token probes have a few dozen unseen documents of each kind.
COMPARE_VAL_FRACTION = 0.1


def shared_store(out: Path, tree: dict[str, Any], corpus: list[str] | None, store: str | None,
                  overwrite: bool, progress: bool, say: Callable[[str], None]) -> str:
    """The one store every run trains on: ``store`` as given, or ``corpus`` prepared once."""
    from lmobjectives.store.prepare import prepare_store
    from lmobjectives.store.store import TokenStore
    from lmobjectives.tokenizer import tokenizer_fingerprint
    from lmobjectives.spec import resolve_tokenizer

    if store is not None:
        TokenStore(store)  # a clear error now if it is not a store
        return store
    corpus = list(corpus or ["default"])
    tree["data"].setdefault("val_fraction", COMPARE_VAL_FRACTION)
    cfg = build_config({**copy.deepcopy(tree), "data": {**tree["data"], "corpus": corpus}})
    tok, _ = resolve_tokenizer(cfg, out)  # the shipped one, --tokenizer, or trained in DIR/tokenizer
    d, store_dir = cfg.data, out / "store"
    want = {"corpus": corpus, "val_fraction": d.val_fraction, "seed": cfg.train.seed,
            "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    if (store_dir / "manifest.json").is_file():
        m = TokenStore(store_dir).manifest
        changed = [k for k, v in want.items() if m.get(k) != v]
        if not changed:
            return str(store_dir)
        if not overwrite:
            raise UserError(f"{store_dir} was prepared with another {', '.join(changed)}; pass "
                            "--overwrite to prepare it again (and retrain), or use another --out")
    say(f"preparing the shared store {store_dir} from {', '.join(corpus)}")
    prepare_store(corpus, tok, store_dir, val_fraction=d.val_fraction, seed=cfg.train.seed,
                  encoding=d.encoding, text_field=d.text_field, split=d.split, progress=progress)
    return str(store_dir)


def shared_tokenizer(shared: Any) -> tuple[Any, Any]:
    """The tokenizer every run shares (the config's, else the store's) and its special ids."""
    from lmobjectives.tokenizer import load_tokenizer
    from lmobjectives.tokenizer.special import SpecialIds

    tok = load_tokenizer(shared.data.tokenizer or str(Path(shared.data.store) / "tokenizer"))
    return tok, SpecialIds.from_vocab(tok.get_vocab(with_added_tokens=True), tok.get_vocab_size())
