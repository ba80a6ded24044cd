"""The driver's type casters that ``hoardrun.db`` installs in place of peewee's."""

import pickle
import random
import uuid

import psycopg2.extensions
import pytest

from hoardrun.db import _UUID_TYPE, _uuid_from_text

# Fixed ids (a seeded generator), so a failure names the same id on every run.
_RANDOM = random.Random(2950)
SAMPLES = [uuid.UUID(int=0), uuid.UUID(int=(1 << 128) - 1),
           uuid.UUID("00000000-0000-0000-0000-0000000000ff")] + [
    uuid.UUID(int=_RANDOM.getrandbits(128), version=4) for _ in range(50)]


@pytest.mark.parametrize("expected", SAMPLES, ids=str)
def test_a_uuid_column_is_the_uuid_python_would_build(expected):
    value = _uuid_from_text(str(expected), None)
    assert type(value) is uuid.UUID
    assert value == expected and hash(value) == hash(expected)
    assert str(value) == str(expected) and value.hex == expected.hex
    assert value.version == expected.version and value.is_safe is uuid.SafeUUID.unknown
    assert pickle.loads(pickle.dumps(value)) == expected
    assert {value: 1}[expected] == 1


def test_null_is_none():
    assert _uuid_from_text(None, None) is None


def test_the_caster_is_the_one_psycopg2_uses():
    # peewee registers psycopg2.extras.register_uuid at import; ours replaces it.
    assert psycopg2.extensions.string_types[2950] is _UUID_TYPE
    assert psycopg2.extensions.string_types[2951].name == "HOARDRUN_UUID[]"
    assert _UUID_TYPE("726b576b-5933-4d08-b3e1-e6dcdd6c3d05", None) == uuid.UUID(
        "726b576b-5933-4d08-b3e1-e6dcdd6c3d05")
