"""`sub300 keys create | list | revoke` on a real SQLite records database, and the key it made works."""
from __future__ import annotations

import json

import pytest

from sub300.agent.auth.keys import verify_secret
from sub300.agent.config import load_config
from sub300.cli import main


@pytest.mark.slow   # each command opens the store and checks its Alembic revision: ~0.5 s in all
def test_keys_create_list_revoke(tmp_path, monkeypatch, capsys, root_logging):
    monkeypatch.setenv("SUB300_RECORDS_URL", f"sqlite:///{tmp_path / 'records.db'}")
    assert main(["keys", "create", "--name", "backend", "--scopes", "calls,model", "--record-audio", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["secret"].startswith(f"s300_{created['id']}_") and created["scopes"] == ["calls", "model"]
    assert main(["keys", "list", "--json"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)["keys"]
    assert listed["id"] == created["id"] and listed["record_audio"] and "secret" not in json.dumps(listed)

    from sub300.agent.records import open_store

    store = open_store(load_config(None))
    try:
        key = verify_secret(created["secret"], store)
        assert key is not None and key.active and key.scopes == frozenset({"calls", "model"})
        assert main(["keys", "revoke", created["id"]]) == 0
        assert not store.key_by_id(created["id"]).active
    finally:
        store.close()
    assert main(["keys", "revoke", created["id"]]) == 1            # already revoked
    assert main(["keys", "create", "--name", "x", "--scopes", "root"]) == 2
    assert "unknown scope 'root'" in capsys.readouterr().err
