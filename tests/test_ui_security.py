"""The UI's two guards: every path confined to the root folders (symlinks followed before the check),
and the access token on every http request and websocket."""

import contextlib
import hmac
import os
from http.cookies import SimpleCookie
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from finetune.errors import FinetuneError
from finetune.ui import auth
from finetune.ui.auth import COOKIE, TokenMiddleware, needs_token, new_token
from finetune.ui.roots import PathRefused, Roots

# --- Roots ------------------------------------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """photos/ (the root) with a dataset, and secret/ beside it (outside), with links between."""
    root, outside = tmp_path / "photos", tmp_path / "secret"
    (root / "rex").mkdir(parents=True)
    (root / "rex" / "dog1.png").write_bytes(b"png")
    (root / "other").mkdir()
    (root / "other" / "cat.png").write_bytes(b"png")
    outside.mkdir()
    (outside / "id_ed25519").write_text("key")
    (root / "rex" / "key").symlink_to(outside / "id_ed25519")  # file link out
    (root / "rex" / "home").symlink_to(outside)  # folder link out
    (root / "rex" / "cat.png").symlink_to(root / "other" / "cat.png")  # link inside
    (root / "rex" / "gone").symlink_to(outside / "not-yet")  # dangling link out
    return Roots([root]), root, outside


def test_a_file_inside_is_its_real_path(tree):
    roots, root, _ = tree
    real = (root / "rex" / "dog1.png").resolve()
    assert roots.confine(root / "rex" / "dog1.png") == real
    assert roots.confine(str(root / "rex" / "dog1.png")) == real
    assert roots.confine("rex/dog1.png") == real  # relative to the first root
    assert roots.confine(Path("rex")) == real.parent
    assert roots.confine(root) == root.resolve()


@pytest.mark.parametrize("rel", ["../secret/id_ed25519", "rex/../rex/dog1.png", "rex/..", "..", "rex/../../secret"])
def test_dotdot_is_refused_anywhere_even_landing_inside(tree, rel):
    roots, root, _ = tree
    for path in (rel, str(root / rel)):
        with pytest.raises(PathRefused, match=r"'\.\.'"):
            roots.confine(path)


def test_an_absolute_path_outside_is_refused(tree):
    roots, _, outside = tree
    for path in ("/etc/passwd", outside / "id_ed25519", "/"):
        with pytest.raises(PathRefused, match="outside"):
            roots.confine(path)


def test_a_symlink_pointing_out_is_refused(tree):
    roots, root, _ = tree
    for path in ("rex/key", "rex/home", "rex/home/id_ed25519", root / "rex" / "home" / "id_ed25519"):
        with pytest.raises(PathRefused, match="outside"):
            roots.confine(path)
    # Not even as a place for a new file, through the link or by the dangling link itself.
    for path in ("rex/home/new.txt", "rex/home/new/deeper.txt", "rex/gone"):
        with pytest.raises(PathRefused, match="outside"):
            roots.confine(path, must_exist=False)


def test_a_symlink_pointing_elsewhere_inside_is_allowed(tree):
    roots, root, _ = tree
    assert roots.confine("rex/cat.png") == (root / "other" / "cat.png").resolve()


def test_a_root_reached_through_a_symlink_is_itself(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    roots = Roots([tmp_path / "link"])
    assert roots.folders == [real.resolve()]
    assert roots.confine(tmp_path / "link" / "new.txt", must_exist=False) == real.resolve() / "new.txt"


def test_a_missing_path(tree):
    roots, root, _ = tree
    with pytest.raises(PathRefused, match="does not exist"):
        roots.confine("rex/dog2.png")
    assert roots.confine("rex/dog2.txt", must_exist=False) == root.resolve() / "rex" / "dog2.txt"
    assert roots.confine("new/run/a.txt", must_exist=False) == root.resolve() / "new" / "run" / "a.txt"
    for path in ("/etc/finetune-new.txt", root.parent / "new" / "a.txt"):
        with pytest.raises(PathRefused, match="outside"):
            roots.confine(path, must_exist=False)


def test_nul_bytes_and_non_paths_are_refused(tree):
    roots, _, _ = tree
    with pytest.raises(PathRefused, match="NUL") as refused:
        roots.confine("rex/dog1.png\x00.txt")
    assert "\x00" not in str(refused.value) and "\n" not in str(refused.value)
    for bad in (None, 3, b"rex/dog1.png", ["rex"], ""):
        with pytest.raises(PathRefused):
            roots.confine(bad)


def test_several_roots(tmp_path):
    a, b = tmp_path / "photos", tmp_path / "models"
    (a / "rex").mkdir(parents=True)
    (b / "sd15").mkdir(parents=True)
    (tmp_path / "between").mkdir()
    roots = Roots([a, str(b), a])  # duplicates removed
    assert roots.folders == [a.resolve(), b.resolve()]
    assert roots.confine(b / "sd15") == (b / "sd15").resolve()
    assert roots.confine("rex") == (a / "rex").resolve()
    with pytest.raises(PathRefused):
        roots.confine("sd15")  # relative paths are taken from the first root only
    with pytest.raises(PathRefused, match="outside"):
        roots.confine(tmp_path / "between")
    assert roots.display(roots.confine(b / "sd15")) == "models/sd15"


def test_display(tree):
    roots, root, outside = tree
    assert roots.display(roots.confine("rex/dog1.png")) == "photos/rex/dog1.png"
    assert roots.display(roots.confine(root)) == "photos"
    assert roots.display(roots.confine("rex/cat.png")) == "photos/other/cat.png"
    with pytest.raises(PathRefused):
        roots.display(outside / "id_ed25519")


def test_nested_roots_display_from_the_innermost(tmp_path):
    (tmp_path / "data" / "rex").mkdir(parents=True)
    roots = Roots([tmp_path / "data", tmp_path])
    assert roots.display(roots.confine(tmp_path / "data" / "rex")) == "data/rex"


def test_a_root_must_be_an_existing_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    for bad in ([tmp_path / "missing"], [tmp_path / "file.txt"], [tmp_path, tmp_path / "missing"], []):
        with pytest.raises(PathRefused) as refused:
            Roots(bad)
        assert isinstance(refused.value, FinetuneError) and "\n" not in str(refused.value)


def test_walk_stays_inside_and_is_depth_limited(tree):
    roots, root, _ = tree
    (root / "rex" / "loop").symlink_to(root)  # a loop back to the root ends
    (root / "a" / "b" / "c" / "d" / "e").mkdir(parents=True)
    found = list(roots.walk())
    real = root.resolve()
    assert found[0] == real
    assert set(found) == {real, real / "rex", real / "other", real / "a", real / "a" / "b", real / "a" / "b" / "c",
                          real / "a" / "b" / "c" / "d"}
    assert len(found) == len(set(found))
    assert list(roots.walk(max_depth=0)) == [real]


# --- the access token ---------------------------------------------------------------------------

TOKEN = "s3cret-token_value"


def _app(lifespan_log: list | None = None):
    async def page(request):
        return PlainTextResponse(f"page {request.url.path} {request.query_params.get('x', '')}")

    async def echo(websocket):
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if lifespan_log is not None:
            lifespan_log.append("started")
        yield

    return Starlette(routes=[Route("/", page, methods=["GET", "POST"]), Route("/page", page, methods=["GET", "POST"]),
                             WebSocketRoute("/ws", echo)], lifespan=lifespan)


@pytest.fixture
def client():
    return TestClient(TokenMiddleware(_app(), TOKEN))


def _ws_refused(client, url, **kwargs):
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect(url, **kwargs):
            pass
    return closed.value.code


def test_no_token_is_refused(client):
    response = client.get("/page")
    assert response.status_code == 401
    assert response.text == "finetune ui: missing or wrong access token"
    assert client.post("/page").status_code == 401
    assert _ws_refused(client, "/ws") == 1008


def test_a_wrong_token_is_refused(client):
    assert client.get("/page", headers={"Authorization": f"Bearer {TOKEN}x"}).status_code == 401
    assert client.get("/page", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
    assert client.get("/page", headers={"Authorization": "Bearer \u00e9t\u00e9".encode()}).status_code == 401
    assert client.get("/page", params={"token": TOKEN[:-1]}, follow_redirects=False).status_code == 401
    client.cookies.set(COOKIE, "nope")
    assert client.get("/page").status_code == 401
    assert _ws_refused(client, "/ws?token=nope") == 1008


def test_a_bearer_header_passes(client):
    response = client.get("/page?x=1", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200 and response.text == "page /page 1"
    assert client.post("/page", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    with client.websocket_connect("/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert ws.receive_text() == "hello"


def test_token_in_the_link_becomes_a_cookie_and_leaves_the_url(client):
    response = client.get("/page", params={"x": "1", "token": TOKEN}, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/page?x=1"
    cookie = SimpleCookie(response.headers["set-cookie"])[COOKIE]
    assert cookie.value == TOKEN
    assert cookie["httponly"] and cookie["samesite"].lower() == "strict" and cookie["path"] == "/"
    assert not cookie["secure"]  # plain http: a Secure cookie would never come back

    # The client keeps the cookie, as a browser does: later requests need nothing else.
    assert client.get("/page?x=2").text == "page /page 2"
    assert client.get("/").status_code == 200
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hello"


def test_the_redirect_stays_on_this_host(client):
    # A path starting with "//" would make a Location a browser reads as another host.
    response = client.get(f"http://testserver//evil.example/x?token={TOKEN}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/evil.example/x"


def test_a_post_with_the_token_in_the_link_is_served_and_sets_the_cookie(client):
    response = client.post(f"/page?x=3&token={TOKEN}", follow_redirects=False)
    assert response.status_code == 200 and response.text == "page /page 3"
    assert SimpleCookie(response.headers["set-cookie"])[COOKIE].value == TOKEN


def test_over_https_the_cookie_is_secure():
    client = TestClient(TokenMiddleware(_app(), TOKEN), base_url="https://testserver")
    response = client.get(f"/?token={TOKEN}", follow_redirects=False)
    assert SimpleCookie(response.headers["set-cookie"])[COOKIE]["secure"]


def test_a_websocket_with_the_token_in_the_link_is_accepted(client):
    with client.websocket_connect(f"/ws?token={TOKEN}") as ws:
        assert ws.receive_text() == "hello"


def test_without_a_token_everything_passes():
    client = TestClient(TokenMiddleware(_app(), None))
    assert client.get("/page").status_code == 200
    assert client.get("/page?token=anything", follow_redirects=False).status_code == 200
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "hello"


def test_lifespan_passes_through():
    log = []
    with TestClient(TokenMiddleware(_app(log), TOKEN)):
        assert log == ["started"]


def test_tokens_are_compared_in_constant_time(client, monkeypatch):
    calls, real = [], hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert client.get("/page", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/page", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (b"wrong", TOKEN.encode()) in calls and (TOKEN.encode(), TOKEN.encode()) in calls


@pytest.mark.parametrize("host, needed", [("127.0.0.1", False), ("localhost", False), ("::1", False),
                                          ("[::1]", False), ("LOCALHOST", False), ("127.0.0.2", False),
                                          ("0.0.0.0", True), ("192.168.1.5", True), ("::", True), ("", True),
                                          ("myhost.lan", True)])
def test_needs_token(host, needed):
    assert needs_token(host) is needed


def test_new_tokens_are_long_and_url_safe():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    assert all(len(t) >= 32 and t.replace("-", "").replace("_", "").isalnum() for t in tokens)


def test_the_test_tree_really_has_links(tree):
    # Guards the guards: if the fixture's links were not links, the refusals above would prove little.
    _, root, _ = tree
    assert os.path.islink(root / "rex" / "key") and os.path.islink(root / "rex" / "home")
