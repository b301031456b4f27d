"""Runs one untrusted program inside the sandbox, under a Python audit hook.

`python -I -B sandbox_guard.py DIR PROGRAM GUARD` (GUARD is 1 or 0). Standalone, stdlib only.

The audit hook (PEP 578) is the Python-level layer: it refuses process creation (fork, exec,
system, subprocess), signals to other processes, sockets, ctypes, writes and destructive file
operations outside DIR, and reads of other processes' /proc entries. It turns naive misbehaviour
into a clear PermissionError; the kernel layers set up by the supervisor (namespaces, read-only
mounts, cgroup, rlimits, no capabilities) are what contain code that gets past it.

A program passes only if it runs to the end: the guard then prints a nonce it read from stdin,
so `exit(0)` or `os._exit(0)` in generated code cannot fake a pass. (Code that deliberately
introspects the interpreter's frames could find the nonce; that forges a verdict, it does not
escape containment.)
"""
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED_EVENTS = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "subprocess.Popen",
    "os.kill", "os.killpg", "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto", "ctypes.dlopen", "ctypes.dlsym",
    "ctypes.cdata", "ctypes.call_function"}
# _posixsubprocess.fork_exec spawns without an audit event, so the module itself is refused
BLOCKED_IMPORTS = {"ctypes", "_ctypes", "cffi", "_posixsubprocess", "pty"}
# events whose arguments at these positions are paths that must stay inside DIR
PATH_EVENTS = {"os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "os.chmod": (0,),
               "os.chown": (0,), "os.link": (0, 1), "os.symlink": (1,), "os.truncate": (0,),
               "os.utime": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,), "shutil.move": (0, 1)}


def install_guard(root: str) -> None:
    own_proc = {f"/proc/{os.getpid()}", "/proc/self", "/proc/thread-self"}

    def resolve(path) -> str | None:
        if isinstance(path, int) or path is None:
            return None  # an already-open descriptor
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        return os.path.realpath(os.fspath(path))

    def inside(path: str) -> bool:
        return path == root or path.startswith(root + "/") or path == "/dev/null"

    def hook(event: str, args: tuple) -> None:
        if event in BLOCKED_EVENTS:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "import" and args[0] in BLOCKED_IMPORTS:
            raise PermissionError(f"sandbox: importing {args[0]} is not allowed")
        if event == "open":
            path = resolve(args[0])
            if path is None:
                return
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS)
            if writing and not inside(path):
                raise PermissionError(f"sandbox: writing {path} is not allowed")
            parts = path.split("/")
            if len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and "/".join(parts[:3]) not in own_proc:
                raise PermissionError(f"sandbox: reading {path} is not allowed")
        elif event in PATH_EVENTS:
            for i in PATH_EVENTS[event]:
                path = resolve(args[i]) if i < len(args) else None
                if path is not None and not inside(path):
                    raise PermissionError(f"sandbox: {event} on {path} is not allowed")

    sys.addaudithook(hook)


def main() -> None:
    root, program, guard = os.path.realpath(sys.argv[1]), sys.argv[2], sys.argv[3] == "1"
    nonce = sys.stdin.readline().strip()
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, program, "exec")
    if guard:
        install_guard(root)
    namespace = {"__name__": "__main__", "__file__": program, "__builtins__": __builtins__}
    del sys.argv[1:]
    try:
        exec(code, namespace)
    except SystemExit as e:
        if e.code in (None, 0):
            sys.stderr.write("sandbox: the program exited before it finished\n")
            sys.stderr.flush()
            os._exit(3)
        raise
    sys.stdout.flush()
    os.write(1, f"\n{nonce}\n".encode())


if __name__ == "__main__":
    main()
