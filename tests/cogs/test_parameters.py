"""The Parameters text shown to someone other than the job's owner: shared LoRAs stay, private ones are redacted."""
from __future__ import annotations

from types import SimpleNamespace

from cogs._parameters import hide_loras, lora_names, visible_parameters

TEXT = ("a photo of sid with rex <lora:sid:1> <lora:rex:0.8>\n"
        'Steps: 2, Seed: 5, Lora hashes: "sid: aaa111, rex: bbb222", Job id: 7')
OWNER, VIEWER = 1, 2


def test_names_and_hashes_of_hidden_loras_go_the_others_stay():
    assert lora_names(TEXT) == ["sid", "rex"]
    shown = hide_loras(TEXT, ["SID"])
    assert "<lora:a private concept> <lora:rex:0.8>" in shown
    assert 'Lora hashes: "rex: bbb222", Job id: 7' in shown and "aaa111" not in shown
    both = hide_loras(TEXT, ["sid", "rex"])
    assert "Lora hashes" not in both and "Seed: 5, Job id: 7" in both


async def test_only_shared_or_own_concepts_are_named_to_a_viewer():
    concepts = {"sid": SimpleNamespace(owner_id=OWNER, shared=False, status="ready"),
                "rex": SimpleNamespace(owner_id=3, shared=True, status="ready")}

    async def by_token(token):
        return concepts.get(token)

    assert await visible_parameters(TEXT, viewer_id=OWNER, owner_id=OWNER, concept_by_token=by_token) == TEXT
    seen = await visible_parameters(TEXT, viewer_id=VIEWER, owner_id=OWNER, concept_by_token=by_token)
    assert "sid:1" not in seen and "aaa111" not in seen and "<lora:rex:0.8>" in seen and "bbb222" in seen
    del concepts["rex"]  # a deleted concept: nothing says it is shared any more
    assert "bbb222" not in await visible_parameters(TEXT, viewer_id=VIEWER, owner_id=OWNER, concept_by_token=by_token)
