"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only, loopback only).

It implements what huggingface_hub's real upload and download code calls for small files:

* ``POST /api/repos/create``                         create a model repo
* ``POST /api/validate-yaml``                        README metadata check (always valid)
* ``POST /api/models/{repo}/preupload/{rev}``        answers "regular" for every file (no LFS, no Xet)
* ``POST /api/models/{repo}/commit/{rev}``           NDJSON commit: header, base64 files, deletions
* ``GET  /api/models/{repo}[/revision/{rev}]``       repo info (sha, siblings)
* ``HEAD/GET /{repo}/resolve/{rev}/{path}``          file download with ``X-Repo-Commit`` and ``ETag``

Not covered: the LFS and Xet upload paths (large files on the real Hub go there), authentication, pull requests,
branches other than ``main`` (a revision may be ``main`` or a full commit id). Every request is recorded in
``server.requests`` so tests can see what the client did.
"""
import base64
import hashlib
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional, Tuple

__all__ = ['HubServer']


class _Repo:
    def __init__(self) -> None:
        self.commits: Dict[str, Dict[str, bytes]] = {}
        self.main: Optional[str] = None
        self.history: List[str] = []

    def files(self, rev: str) -> Optional[Tuple[str, Dict[str, bytes]]]:
        sha = self.main if rev == 'main' else rev
        if sha is None or sha not in self.commits:
            return None
        return sha, self.commits[sha]


class _Handler(BaseHTTPRequestHandler):
    server: 'HubServer'
    protocol_version = 'HTTP/1.1'

    def log_message(self, fmt, *args):  # keep pytest output clean
        pass

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _send(self, code: int, body: bytes = b'', headers: Optional[Dict[str, str]] = None,
              content_type: str = 'application/json') -> None:
        self.send_response(code)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != 'HEAD':
            self.wfile.write(body)

    def _json(self, code: int, obj, headers: Optional[Dict[str, str]] = None) -> None:
        self._send(code, json.dumps(obj).encode(), headers)

    def _error(self, code: int, error_code: str, message: str) -> None:
        self._json(code, {'error': message}, {'X-Error-Code': error_code, 'X-Error-Message': message})

    def _body(self) -> bytes:
        n = int(self.headers.get('Content-Length') or 0)
        return self.rfile.read(n) if n else b''

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append((self.command, urllib.parse.urlsplit(self.path).path))

    # -- routes ------------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        self._record()
        path = urllib.parse.urlsplit(self.path).path
        body = self._body()
        if path == '/api/repos/create':
            req = json.loads(body or b'{}')
            repo_id = f'{req["organization"]}/{req["name"]}' if req.get('organization') else req['name']
            with self.server.lock:
                self.server.repos.setdefault(repo_id, _Repo())
            return self._json(200, {'url': f'{self.server.url}/{repo_id}', 'name': repo_id, 'id': repo_id})
        if path == '/api/validate-yaml':
            return self._json(200, {'errors': [], 'warnings': []})
        parts = path.split('/')
        # /api/models/{org}/{name}/{preupload|commit}/{rev}
        if len(parts) >= 7 and parts[1] == 'api' and parts[2] == 'models' and parts[5] in ('preupload', 'commit'):
            repo_id = f'{parts[3]}/{parts[4]}'
            rev = urllib.parse.unquote('/'.join(parts[6:]))
            repo = self.server.repos.get(repo_id)
            if repo is None:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
            if rev != 'main':
                return self._error(404, 'RevisionNotFound', f'only main is supported, got {rev}')
            if parts[5] == 'preupload':
                files = json.loads(body)['files']
                return self._json(200, {'files': [
                    {'path': f['path'], 'uploadMode': 'regular', 'shouldIgnore': False, 'oid': None} for f in files]})
            return self._commit(repo_id, repo, body)
        return self._error(404, 'NotFound', f'no route for POST {path}')

    def _commit(self, repo_id: str, repo: _Repo, body: bytes) -> None:
        with self.server.lock:
            files = dict(repo.commits[repo.main]) if repo.main else {}
            summary = ''
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                key, value = item['key'], item['value']
                if key == 'header':
                    summary = value.get('summary', '')
                elif key == 'file':
                    if value.get('encoding') != 'base64':
                        return self._error(400, 'BadRequest', f'unsupported encoding {value.get("encoding")}')
                    files[value['path']] = base64.b64decode(value['content'])
                elif key == 'deletedFile':
                    files.pop(value['path'], None)
                else:  # lfsFile, deletedFolder, ...: outside what this server covers
                    return self._error(400, 'BadRequest', f'unsupported commit operation {key}')
            digest = hashlib.sha1()
            digest.update((repo.main or '').encode() + summary.encode())
            for p in sorted(files):
                digest.update(p.encode() + hashlib.sha1(files[p]).digest())
            sha = digest.hexdigest()
            repo.commits[sha] = files
            repo.main = sha
            repo.history.append(sha)
        return self._json(200, {'commitUrl': f'{self.server.url}/{repo_id}/commit/{sha}', 'commitOid': sha,
                                'pullRequestUrl': None})

    def do_HEAD(self) -> None:
        self._get_or_head()

    def do_GET(self) -> None:
        self._get_or_head()

    def _get_or_head(self) -> None:
        self._record()
        path = urllib.parse.urlsplit(self.path).path
        parts = path.split('/')
        if len(parts) >= 5 and parts[1] == 'api' and parts[2] == 'models':
            repo_id = f'{parts[3]}/{parts[4]}'
            rev = urllib.parse.unquote(parts[6]) if len(parts) >= 7 and parts[5] == 'revision' else 'main'
            repo = self.server.repos.get(repo_id)
            found = repo.files(rev) if repo else None
            if found is None:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
            sha, files = found
            return self._json(200, {'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': False,
                                    'siblings': [{'rfilename': p} for p in sorted(files)]})
        # /{org}/{name}/resolve/{rev}/{path...}
        if len(parts) >= 6 and parts[3] == 'resolve':
            repo_id = f'{parts[1]}/{parts[2]}'
            rev = urllib.parse.unquote(parts[4])
            filename = urllib.parse.unquote('/'.join(parts[5:]))
            repo = self.server.repos.get(repo_id)
            if repo is None:
                return self._error(404, 'RepoNotFound', f'Repository {repo_id} not found')
            found = repo.files(rev)
            if found is None:
                return self._error(404, 'RevisionNotFound', f'Revision {rev} not found')
            sha, files = found
            if filename not in files:
                return self._error(404, 'EntryNotFound', f'{filename} not found in {repo_id}@{sha}')
            data = files[filename]
            etag = hashlib.sha1(data).hexdigest()
            return self._send(200, data, {'X-Repo-Commit': sha, 'ETag': f'"{etag}"'},
                              content_type='application/octet-stream')
        return self._error(404, 'NotFound', f'no route for {self.command} {path}')


class HubServer(ThreadingHTTPServer):
    """In-memory Hub on ``127.0.0.1`` (an ephemeral port); ``start()`` serves on a daemon thread, ``stop()`` ends it.

    Attributes:
        url: the endpoint to put into ``HF_ENDPOINT``.
        repos: ``{repo_id: _Repo}`` with every commit's files.
        requests: ``[(method, path)]`` in arrival order.
    """
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(('127.0.0.1', 0), _Handler)
        self.url = f'http://127.0.0.1:{self.server_address[1]}'
        self.repos: Dict[str, _Repo] = {}
        self.requests: List[Tuple[str, str]] = []
        self.lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> 'HubServer':
        self._thread = threading.Thread(target=self.serve_forever, name='hub-server', daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)


if __name__ == '__main__':  # manual use: python tests/helpers/hub_server.py
    srv = HubServer()
    print(f'serving on {srv.url} (Ctrl-C to stop)')
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        srv.server_close()
