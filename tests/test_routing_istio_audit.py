"""Routing behaviours an Istio/Envoy comparison found different (session 8 audit), each pinned against the
Istio or Envoy source it follows. The repro scripts were /tmp/audit8/p*.py."""

from __future__ import annotations

import pytest

from policy.routing.model import (
    CONNECT_FAILURE, PER_TRY_TIMEOUT, REFUSED_STREAM, RESET, RESET_BEFORE_REQUEST, HTTP_RETRY_ON, RetryPolicy,
)

# ---------------------------------------------------------------------------------------------
# RetryPolicy.retriable for failures without a response (Envoy retry_state_impl.cc wouldRetryFromReset)

# Which retry_on names retry each failure kind, and which do not: every HTTP retry_on name is in exactly
# one of the two sets, so dropping or adding one name to a kind's row fails here.
RETRIED_BY = {
    # LocalConnectionFailure/RemoteConnectionFailure/ConnectionTimeout: connect-failure, then (nothing was
    # sent) reset-before-request, then reset, then 5xx / gateway-error.
    CONNECT_FAILURE: {"connect-failure", "reset-before-request", "reset", "5xx", "gateway-error"},
    # RemoteRefusedStreamReset after the headers went out: refused-stream, reset, 5xx, gateway-error.
    REFUSED_STREAM: {"refused-stream", "reset", "5xx", "gateway-error"},
    # A reset before any byte went upstream.
    RESET_BEFORE_REQUEST: {"reset-before-request", "reset", "5xx", "gateway-error"},
    # A reset after the request started.
    RESET: {"reset", "5xx", "gateway-error"},
    # router.cc onPerTryTimeoutCommon → maybeRetryReset(LocalReset): a reset after the request started.
    PER_TRY_TIMEOUT: {"reset", "5xx", "gateway-error"},
}


@pytest.mark.parametrize("error", sorted(RETRIED_BY))
@pytest.mark.parametrize("name", sorted(HTTP_RETRY_ON))
def test_each_retry_on_name_retries_exactly_the_failures_envoy_retries(error, name):
    assert RetryPolicy(2, frozenset({name})).retriable(error) is (name in RETRIED_BY[error])


def test_gateway_error_retries_every_reset_kind():
    # The audit's repro: all False before.
    p = RetryPolicy(2, frozenset({"gateway-error"}))
    assert [p.retriable(e) for e in (RESET, REFUSED_STREAM, RESET_BEFORE_REQUEST, CONNECT_FAILURE)] == [True] * 4


def test_grpc_names_and_unknown_errors_retry_no_failure():
    p = RetryPolicy(2, frozenset({"unavailable", "cancelled", "retriable-status-codes"}), frozenset({503}))
    assert not any(p.retriable(e) for e in (*RETRIED_BY, "no-such-failure"))
