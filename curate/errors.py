"""Errors curate raises for users: each says what was wrong, where, and what to do."""


class CurateError(Exception):
    """Base class of the errors curate reports to users."""


class ConfigError(CurateError):
    """A config is invalid. `problems` lists (key path, reason) pairs."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"invalid config{where}:"]
        lines += [f"  {path or '<top level>'}: {reason}" for path, reason in problems]
        super().__init__("\n".join(lines))


class RunError(CurateError):
    """A run could not complete."""


#: What an object store's error code means for the user.
_STORE_CODES = {
    "SignatureDoesNotMatch": "the object store refused the credentials",
    "InvalidAccessKeyId": "the object store does not know the access key",
    "AccessDenied": "the object store denied access",
    "ExpiredToken": "the object store's session token has expired",
    "InvalidToken": "the object store refused the session token",
    "NoSuchBucket": "the bucket does not exist",
}


def _object_store_message(text: str) -> str | None:
    """One line for an S3-protocol error answer buried in a Lance error, or None."""
    import re

    code = re.search(r"<Code>(\w+)</Code>", text)
    if code is None:
        refused = re.search(r"(https?://[^/\s]+)[^\s]*.*(Connection refused|error trying to "
                            r"connect|dns error)", text)
        if refused:
            return (f"cannot reach the object store at {refused.group(1)} "
                    f"({refused.group(2)}): check store.storage_options' endpoint")
        return None
    bucket = re.search(r"<BucketName>([^<]+)</BucketName>", text)
    what = _STORE_CODES.get(code.group(1), "the object store refused the request")
    where = f" (bucket {bucket.group(1)})" if bucket else ""
    hint = ("check store.storage_options (aws_access_key_id, aws_secret_access_key, "
            "aws_session_token) or the AWS credentials of the environment"
            if code.group(1) not in ("NoSuchBucket",) else "check store.uri")
    return f"{what}{where}: {code.group(1)}; {hint}"


def storage_message(exc: BaseException) -> str:
    """The first line of a Lance or LanceDB error, without the Rust source location it
    carries (`, /home/.../commit.rs:1663:50`); an object store's error answer becomes one
    line saying what to check."""
    import re

    answer = _object_store_message(str(exc))
    if answer:
        return answer
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    line = re.sub(r",?\s*\S*/[\w./-]+\.rs:\d+(:\d+)?:?", "", line)
    return re.sub(r"^(lance error:\s*)?(LanceError(\(\w+\))?:\s*)?", "", line).strip(" ,:")


def root_cause(exc: BaseException) -> BaseException:
    """A Ray task's or actor's error unwrapped to the exception the worker raised."""
    cause = getattr(exc, "cause", None)
    while isinstance(cause, BaseException):
        exc, cause = cause, getattr(cause, "cause", None)
    return exc


#: How a full disk and a store this user may not write show in an error's text.
DISK_FULL = ("No space left", "os error 28", "Disk quota")
NO_WRITE = ("Permission denied", "os error 13", "Read-only", "os error 30")


def says(text: str, signs: tuple[str, ...]) -> bool:
    return any(sign in text for sign in signs)


def is_storage_failure(exc: BaseException) -> bool:
    """A failure of the disk or object store under the table rather than of the data."""
    return says(str(root_cause(exc)), DISK_FULL + NO_WRITE)


def describe_failure(exc: BaseException) -> str:
    """One line for an unexpected failure: a Ray task's error is unwrapped to its cause,
    a full disk is named as such."""
    exc = root_cause(exc)
    text = storage_message(exc)
    if says(text, DISK_FULL):
        return f"a disk is full ({text}); free space and run the same command again"
    return f"{type(exc).__name__}: {text}"
