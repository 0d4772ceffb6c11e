"""Signed query ids: issued by inference, verified by feedback without a lookup."""

import pytest

from flywheel_common.errors import InvalidArgument
from flywheel_common.pseudonym import pseudonymise
from flywheel_common.query_ids import QueryIdSigner, Voters, count_voters, query_id_network, query_id_session

KEY = b"0123456789abcdef0123"


def test_issued_ids_verify_and_carry_the_model_version() -> None:
    signer = QueryIdSigner(KEY)
    first, second = signer.issue("v7"), signer.issue("v7")
    assert first != second
    claims = signer.verify(first)
    assert claims.model_version == "v7" and claims.query_id == first


@pytest.mark.parametrize(
    "mutate",
    [
        lambda q: q[:-2] + ("AA" if not q.endswith("AA") else "BB"),  # signature
        lambda q: q.replace(".", ".x", 1),  # nonce
        lambda q: "q4" + q[2:],  # prefix
        lambda q: "q1" + q[2:],  # an old prefix on a new id
        lambda q: "q2" + q[2:],
        lambda q: q.replace("." + "ab" * 16 + ".", "." + "cd" * 16 + "."),  # another session
        lambda q: q.replace("." + "ef" * 16 + ".", "." + "cd" * 16 + "."),  # another network
        lambda q: q.replace("." + "ef" * 16 + ".", ".."),  # no network
        lambda q: q + ".extra",
        lambda q: "",
        lambda q: "not-a-query-id",
        lambda q: q[:-1] + "é",  # a non-ASCII signature (compare_digest raised TypeError on it)
        lambda q: q.replace(".", ".ü", 1),  # non-ASCII elsewhere
        lambda q: q[:-1] + "\x00",
    ],
)
def test_tampered_or_malformed_ids_are_invalid(mutate: object) -> None:
    signer = QueryIdSigner(KEY)
    with pytest.raises(InvalidArgument):
        signer.verify(mutate(signer.issue("v1", "ab" * 16, "ef" * 16)))  # type: ignore[operator]


def test_ids_carry_the_asking_session_and_network_and_old_ids_verify_without_them() -> None:
    signer = QueryIdSigner(KEY)
    session = pseudonymise(KEY, "visitor-1", domain="session")
    network = pseudonymise(KEY, "203.0.113.0/24", domain="network")
    claims = signer.verify(signer.issue("v2", session, network))
    assert (claims.session_pseudonym, claims.network_pseudonym) == (session, network)
    query_id = signer.issue("v2", session, network)
    assert (query_id_session(query_id), query_id_network(query_id)) == (session, network)
    assert signer.verify(signer.issue("v2", session)).network_pseudonym == ""
    assert signer.verify(signer.issue("v2")).session_pseudonym == ""
    for bad in ("not.hex", "AB" * 16):
        with pytest.raises(ValueError):
            signer.issue("v2", bad)
        with pytest.raises(ValueError):
            signer.issue("v2", session, bad)
    # Older ids stay valid until they expire: a q2 id carried the session only, a q1 id neither.
    q2_body = ".".join(["q2", "ab" * 12, "1000000", "djE", session])
    q2 = f"{q2_body}.{signer._sign(q2_body)}"
    claims = signer.verify(q2, now=1_000_010)
    assert (claims.model_version, claims.session_pseudonym, claims.network_pseudonym) == ("v1", session, "")
    assert (query_id_session(q2), query_id_network(q2)) == (session, "")
    q1_body = ".".join(["q1", "ab" * 12, "1000000", "djE"])
    q1 = f"{q1_body}.{signer._sign(q1_body)}"
    claims = signer.verify(q1, now=1_000_010)
    assert (claims.model_version, claims.session_pseudonym) == ("v1", "")
    assert (query_id_session(q1), query_id_network(q1)) == ("", "")


def test_another_key_rejects_and_old_ids_expire() -> None:
    query_id = QueryIdSigner(KEY).issue("v1", now=1_000_000)
    with pytest.raises(InvalidArgument, match="not issued"):
        QueryIdSigner(b"another-key-of-16-bytes").verify(query_id, now=1_000_000)
    signer = QueryIdSigner(KEY, max_age_s=60)
    assert signer.verify(query_id, now=1_000_059).issued_at == 1_000_000
    with pytest.raises(InvalidArgument, match="expired"):
        signer.verify(query_id, now=1_000_061)


def test_short_keys_are_refused() -> None:
    with pytest.raises(ValueError):
        QueryIdSigner(b"short")


def test_pseudonyms_are_stable_keyed_and_not_the_id() -> None:
    a = pseudonymise(KEY, "alice@example.org")
    assert a == pseudonymise(KEY, "alice@example.org")
    assert a != pseudonymise(b"other-key", "alice@example.org")
    assert "alice" not in a and len(a) == 32
    assert pseudonymise(KEY, "") == ""


def test_what_shares_a_session_or_a_network_is_one_voter() -> None:
    # One session asking from its IPv4 /24 and its IPv6 /48 (a dual-stack line): one voter, and
    # another session of either network joins it.
    assert count_voters([("s1", "v4"), ("s1", "v6")]) == 1
    assert count_voters([("s1", "v4"), ("s1", "v6"), ("s2", "v6"), ("s3", "v4")]) == 1
    # Transitively: s1 links v4 and v6, s2 links v6 and v6b.
    voters = Voters([("s1", "v4"), ("s1", "v6"), ("s2", "v6"), ("s2", "v6b")])
    assert voters.of("s9", "v6b") == voters.of("s1", "") == voters.of("", "v4")
    # Two sessions on two networks of their own stay two (the limit docs/security.md names), and a
    # session asking without a network is its own voter unless it was seen on one.
    assert count_voters([("s1", "v4"), ("s2", "v6")]) == 2
    assert count_voters([("s1", ""), ("s2", ""), ("s1", "v4")]) == 2
    # No session links nothing: events without one from two networks are two voters, not one.
    assert count_voters([("", "v4"), ("", "v6")]) == 2
    assert count_voters([]) == 0
