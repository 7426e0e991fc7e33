"""The live CAPTCHA service in-process: it judges answers, and refuses abuse cleanly without leaking the answer."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from captcha_service_support import (
    GENEROUS,
    ColourClassifier,
    FakeClock,
    TestClient,
    answer,
    check_a_full_table_replaces_instead_of_refusing,
    make_pool,
    new_challenge,
    truth,
)
from PIL import Image

from asirra.captcha.safeguards import make_safeguard
from asirra.captcha.service.app import create_app, parse_selection, usable_pool
from asirra.captcha.service.settings import ServiceError, ServiceSettings
from asirra.images import load_image


@pytest.fixture
def pool(tmp_path):
    return make_pool(tmp_path / "pool", cats=15, dogs=15)


def _app(pool, safeguard="none", clock=None, **settings):
    base = {**GENEROUS.__dict__, **settings}
    kwargs = {"clock": clock} if clock else {}
    return create_app(pool, make_safeguard(safeguard), ServiceSettings(**base), **kwargs)








def _refused(response, status: int, words: str) -> None:
    assert response.status_code == status, response.text
    assert words in response.json()["error"]


def test_page_is_served_with_the_grid_and_its_script(pool):
    client = TestClient(_app(pool))
    page = client.get("/")
    assert page.status_code == 200 and 'id="grid"' in page.text
    assert client.get("/static/app.js").status_code == 200
    assert page.headers["x-frame-options"] == "DENY"


def test_challenge_has_twelve_metadata_free_jpegs_that_expire(pool):
    client = TestClient(_app(pool, ttl_seconds=60))
    challenge = new_challenge(client)
    assert set(challenge) == {"id", "images", "expires_in"} and challenge["expires_in"] == 60
    assert len(challenge["images"]) == len(set(challenge["images"])) == 12
    for url in challenge["images"]:
        reply = client.get(url)
        assert reply.headers["content-type"] == "image/jpeg" and reply.headers["cache-control"] == "no-store"
        image = Image.open(io.BytesIO(reply.content))
        assert image.format == "JPEG" and not image.getexif() and "icc_profile" not in image.info
        assert max(load_image(reply.content).size) <= 240


def test_right_answer_passes_and_wrong_answer_fails(pool):
    app = _app(pool)
    client = TestClient(app)
    right = new_challenge(client)
    assert answer(client, right["id"], truth(app, right)).json()["result"] == "pass"
    wrong = new_challenge(client)
    assert answer(client, wrong["id"], set(range(12)) - truth(app, wrong)).json()["result"] == "fail"


def test_replayed_answer_is_refused_and_leaves_the_safeguard_untouched(pool):
    # Partial credit passes the second near miss in a row: had the replay been judged, it would
    # have been that second near miss, and the next near miss would be "almost" again.
    app = _app(pool, safeguard="partial-credit")
    client = TestClient(app)
    first = new_challenge(client)
    one_slip = truth(app, first) ^ {0}
    assert answer(client, first["id"], one_slip).json()["result"] == "almost"
    _refused(answer(client, first["id"], one_slip), 409, "already answered")
    second = new_challenge(client)
    assert answer(client, second["id"], truth(app, second) ^ {0}).json()["result"] == "pass"


def test_expired_challenge_and_its_images_are_refused(pool):
    clock = FakeClock()
    app = _app(pool, clock=clock, ttl_seconds=30)
    client = TestClient(app)
    challenge = new_challenge(client)
    cats = truth(app, challenge)
    clock.now += 31
    _refused(client.get(challenge["images"][0]), 404, "unknown or expired")
    _refused(answer(client, challenge["id"], cats), 410, "expired")
    assert new_challenge(client)["id"] != challenge["id"]


def test_unknown_challenge_and_image_are_refused(pool):
    client = TestClient(_app(pool))
    _refused(answer(client, "no-such-challenge", []), 404, "unknown challenge")
    _refused(client.get("/api/image/no-such-image"), 404, "unknown")
    _refused(client.get("/no/such/page"), 404, "not found")


@pytest.mark.parametrize(
    "body, status, words",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, '{"selected"'),
        (b'{"picked": [1]}', 422, '{"selected"'),
        (b'{"selected": "1,2"}', 422, "must be a list"),
        (json.dumps({"selected": list(range(12)) + [0]}).encode(), 422, "at most 12"),
        (b'{"selected": [12]}', 422, "out of range"),
        (b'{"selected": [-1]}', 422, "out of range"),
        (b'{"selected": [1.5]}', 422, "integers"),
        (b'{"selected": ["3"]}', 422, "integers"),
        (b'{"selected": [true]}', 422, "integers"),
        (b'{"selected": [4, 4]}', 422, "once"),
        (b"\xff\xfe", 400, "not valid JSON"),
    ],
)
def test_malformed_answer_is_refused_and_the_challenge_stays_answerable(pool, body, status, words):
    app = _app(pool)
    client = TestClient(app)
    challenge = new_challenge(client)
    _refused(client.post(f"/api/challenge/{challenge['id']}/answer", content=body), status, words)
    assert answer(client, challenge["id"], truth(app, challenge)).json()["result"] == "pass"


def test_oversized_body_is_refused_whether_declared_or_streamed(pool):
    app = _app(pool, max_body_bytes=1024)
    client = TestClient(app)
    challenge = new_challenge(client)
    url = f"/api/challenge/{challenge['id']}/answer"
    _refused(client.post(url, content=b" " * 100_000), 413, "over 1024 bytes")
    streamed = (b" " * 1000 for _ in range(100))  # chunked: no Content-Length to check up front
    _refused(client.post(url, content=streamed), 413, "over 1024 bytes")
    assert answer(client, challenge["id"], truth(app, challenge)).json()["result"] == "pass"


def test_same_pool_image_has_a_new_url_and_new_bytes_in_every_challenge(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=6, dogs=6)  # 12 images: every challenge shows them all
    app = _app(pool)
    client = TestClient(app)
    seen = {}
    for _ in range(2):
        challenge = new_challenge(client)
        refs = app.state.store.peek(challenge["id"]).challenge.refs
        for ref, url in zip(refs, challenge["images"]):
            seen.setdefault(ref.source, []).append((url, hashlib.sha256(client.get(url).content).hexdigest()))
    for shown in seen.values():
        (url_1, hash_1), (url_2, hash_2) = shown
        assert url_1 != url_2 and hash_1 != hash_2


def test_no_response_reveals_labels_or_pool_identity(pool):
    app = _app(pool)
    client = TestClient(app)
    challenge = new_challenge(client)
    refs = app.state.store.peek(challenge["id"]).challenge.refs
    images = [client.get(url).content for url in challenge["images"]]
    verdict = answer(client, challenge["id"], []).json()
    assert set(verdict) == {"result", "message"}
    texts = [json.dumps(challenge), json.dumps(verdict)]
    for ref in refs:
        file_name = ref.source.rsplit("/", 1)[-1]  # e.g. "cat.3.jpg": would give the label away
        assert not any(file_name in text for text in texts)
        assert not any(file_name.encode() in data for data in images)


def test_challenge_creation_is_rate_limited_per_client_with_retry_after(pool):
    clock = FakeClock()
    client = TestClient(_app(pool, clock=clock, challenge_rate=0.5, challenge_burst=3))
    for _ in range(3):
        new_challenge(client)
    refused = client.post("/api/challenge")
    _refused(refused, 429, "too many new challenges")
    assert int(refused.headers["retry-after"]) == 2
    clock.now += 2
    new_challenge(client)


def test_any_api_request_is_rate_limited_and_a_new_cookie_does_not_reset_it(pool):
    clock = FakeClock()  # the real clock would refill the bucket whenever the requests run slowly
    app = _app(pool, clock=clock, request_rate=1, request_burst=5)
    challenge = new_challenge(TestClient(app))
    for _ in range(4):
        assert TestClient(app).get(challenge["images"][0]).status_code == 200  # a fresh cookie jar each time
    _refused(TestClient(app).get(challenge["images"][0]), 429, "too many requests")
    clock.now += 1  # one second refills one request at request_rate=1
    assert TestClient(app).get(challenge["images"][0]).status_code == 200
    _refused(TestClient(app).get(challenge["images"][0]), 429, "too many requests")


def test_oldest_outstanding_challenge_is_replaced_beyond_the_per_client_cap(pool):
    app = _app(pool, max_per_client=2)
    client = TestClient(app)
    first, *_ = [new_challenge(client) for _ in range(3)]
    _refused(answer(client, first["id"], []), 410, "replaced")


def test_a_full_server_replaces_the_oldest_challenge_instead_of_refusing(pool):
    app = _app(pool, max_challenges=2)
    check_a_full_table_replaces_instead_of_refusing(*(TestClient(app, client=(f"10.0.0.{i}", 5000)) for i in range(3)))


def test_dropping_the_cookie_does_not_escape_the_token_bucket(pool):
    app = create_app(pool, make_safeguard("token-bucket", capacity=1), GENEROUS)
    bot = TestClient(app, client=("10.0.0.1", 5000))
    failed = new_challenge(bot)
    assert answer(bot, failed["id"], set(range(12)) - truth(app, failed)).json()["result"] == "fail"

    same_address_new_cookie = TestClient(app, client=("10.0.0.1", 5000))
    challenge = new_challenge(same_address_new_cookie)
    assert answer(same_address_new_cookie, challenge["id"], truth(app, challenge)).json()["result"] == "fail"

    elsewhere = TestClient(app, client=("10.0.0.2", 5000))
    challenge = new_challenge(elsewhere)
    assert answer(elsewhere, challenge["id"], truth(app, challenge)).json()["result"] == "pass"


def test_forged_cookie_is_replaced_by_a_signed_one(pool):
    client = TestClient(_app(pool))
    client.cookies.set("asirra_client", "chosen-by-the-client.0000")
    reply = client.post("/api/challenge")
    assert reply.cookies["asirra_client"] != "chosen-by-the-client.0000"


def test_broken_pool_image_is_left_out_at_startup(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=13, dogs=13)
    data = open(pool[0].source, "rb").read()
    open(pool[0].source, "wb").write(data[: len(data) // 2])  # truncated
    usable = usable_pool(pool, progress=False)
    assert pool[0] not in usable and len(usable) == len(pool) - 1


def test_image_unreadable_with_no_readable_substitute_is_a_503_not_a_crash(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=6, dogs=6)
    client = TestClient(_app(pool))
    challenge = new_challenge(client)
    for ref in pool:
        open(ref.source, "wb").write(b"gone")
    _refused(client.get(challenge["images"][0]), 503, "temporarily unavailable")
    assert client.get("/healthz").json()["status"] == "ok"


def test_image_that_breaks_after_startup_is_replaced_by_one_of_the_same_label(tmp_path):
    pool = make_pool(tmp_path / "pool", cats=6, dogs=6)
    app = _app(pool)
    client = TestClient(app)
    challenge = new_challenge(client)
    refs = app.state.store.peek(challenge["id"]).challenge.refs
    open(refs[0].source, "wb").write(b"not an image any more")
    reply = client.get(challenge["images"][0])
    assert reply.status_code == 200
    # The substitute is of the same label, so the answer the server holds is still the truth.
    assert ColourClassifier().solve([reply.content]) == [refs[0].label == 0]


def test_service_refuses_bad_settings_and_too_small_or_unlabelled_pools(tmp_path, pool):
    with pytest.raises(ServiceError, match="ttl_seconds must be positive"):
        ServiceSettings(ttl_seconds=0)
    with pytest.raises(ServiceError, match="image_side"):
        ServiceSettings(image_side=(300, 200))
    with pytest.raises(ServiceError, match="at least 12"):
        create_app(pool[:11], make_safeguard("none"))
    unlabelled = [type(pool[0])(ref.source, None, ref.id) for ref in pool]
    with pytest.raises(ServiceError, match="needs a label"):
        create_app(unlabelled, make_safeguard("none"))


def test_parse_selection_accepts_the_empty_selection_and_every_index():
    assert parse_selection(b'{"selected": []}') == []
    assert parse_selection(json.dumps({"selected": list(range(12))}).encode()) == list(range(12))
