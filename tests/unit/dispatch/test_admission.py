"""Admission before queueing: token buckets, queue caps, and the deadline refusal."""

from __future__ import annotations

import pytest

from gpuvisor.dispatch.admission import Admission, TenantLimits, TokenBucket, deadline_error
from gpuvisor.errors import DeadlineExceeded, TooManyRequests


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=5.0, now=0.0)
    assert [bucket.take(0.0) for _ in range(5)] == [0.0] * 5  # one second's worth at once
    wait = bucket.take(0.0)
    assert wait == pytest.approx(0.2), "the sixth waits for the next token"
    assert bucket.take(0.1) == pytest.approx(0.1), "a refused take consumes nothing"
    assert bucket.take(0.2) == 0.0
    assert bucket.take(10.0) == 0.0 and bucket.tokens == pytest.approx(4.0), "never above burst"


def test_token_bucket_refuses_a_bad_rate() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0.0)


def test_rate_limit_is_per_tenant_and_says_when_to_retry() -> None:
    admission = Admission()
    admission.configure("shop", TenantLimits(requests_per_second=2.0), now=0.0)
    admission.check_rate("shop", 0.0)
    admission.check_rate("shop", 0.0)
    with pytest.raises(TooManyRequests) as refused:
        admission.check_rate("shop", 0.0)
    assert refused.value.http_status == 429
    assert refused.value.retry_after == pytest.approx(0.5)
    assert refused.value.fields["reason"] == "rate_limit"
    assert "requestsPerSecond" in refused.value.message
    for _ in range(100):
        admission.check_rate("chatbot", 0.0)  # no quota: never limited


def test_reconfiguring_the_same_rate_keeps_the_bucket() -> None:
    admission = Admission()
    admission.configure("shop", TenantLimits(requests_per_second=1.0), now=0.0)
    admission.check_rate("shop", 0.0)
    admission.configure("shop", TenantLimits(requests_per_second=1.0), now=0.0)
    with pytest.raises(TooManyRequests):
        admission.check_rate("shop", 0.0)
    admission.configure("shop", TenantLimits(requests_per_second=None), now=0.0)
    admission.check_rate("shop", 0.0)  # limit lifted


def test_queue_caps_name_the_limit_that_was_hit() -> None:
    admission = Admission()
    admission.configure("shop", TenantLimits(max_queued=3), now=0.0)
    admission.check_queues("shop", 2, "shop/d/0", 2, 10, 0.05)
    with pytest.raises(TooManyRequests) as tenant_full:
        admission.check_queues("shop", 3, "shop/d/0", 3, 10, 0.05)
    assert tenant_full.value.fields["reason"] == "tenant_queue_full"
    assert "quota.maxQueued" in tenant_full.value.message
    with pytest.raises(TooManyRequests) as slice_full:
        admission.check_queues("other", 10, "other/d/0", 10, 10, 2.5)
    assert slice_full.value.fields["reason"] == "slice_queue_full"
    assert slice_full.value.retry_after == pytest.approx(2.5)


def test_deadline_error_is_a_503_with_the_numbers() -> None:
    error = deadline_error(budget=0.005, predicted=0.012, queued_ahead=7)
    assert isinstance(error, DeadlineExceeded) and error.http_status == 503
    assert "5 ms" in error.message and "12 ms" in error.message and "7 requests" in error.message
    assert error.fields["reason"] == "deadline_infeasible"


def test_refusals_no_retry_can_mend_say_so_without_retry_after() -> None:
    admission = Admission()
    admission.configure("shop", TenantLimits(max_queued=0), now=0.0)
    with pytest.raises(TooManyRequests) as none_queued:
        admission.check_queues("shop", 0, "shop/d/0", 0, 10, 0.05)
    assert none_queued.value.retry_after is None
    assert "may queue no requests: its quota.maxQueued is 0" in none_queued.value.message
    assert "retry" not in none_queued.value.message
    # the model alone takes longer than the deadline, on an idle device
    alone = deadline_error(budget=0.001, predicted=0.004, queued_ahead=0, alone=0.004)
    assert alone.retry_after is None and "retry" not in alone.message
    assert "the model alone takes 4 ms to run it" in alone.message
    assert alone.fields["reason"] == "deadline_infeasible"
    # when only what waits ahead makes it late, a retry may succeed
    busy = deadline_error(budget=0.005, predicted=0.012, queued_ahead=7, alone=0.001)
    assert busy.retry_after == pytest.approx(0.007) and "retry later" in busy.message


def test_a_refund_gives_back_the_token_of_a_request_refused_later() -> None:
    admission = Admission()
    admission.configure("t", TenantLimits(requests_per_second=1.0), now=0.0)
    admission.check_rate("t", 0.0)  # the burst of 1 is used
    admission.refund("t")  # ...by a request that was then refused for its deadline
    admission.check_rate("t", 0.0)  # so the next one is still within the rate
    with pytest.raises(TooManyRequests):
        admission.check_rate("t", 0.0)
    admission.refund("unknown-tenant")  # no bucket: nothing to give back, no error
