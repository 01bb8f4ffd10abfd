"""boto3 sessions and clients, and the translation of AWS failures into AWSError.

Plain boto3 (not the SageMaker SDK) for everything after submission: describe, stop,
logs, S3. `AWS_ENDPOINT_URL` is honoured by boto3 itself, which is how the tests point
every client at a local moto server.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache

from launcher.errors import AWSError, ConfigError

RETRY = {"max_attempts": 8, "mode": "adaptive"}
NO_REGION_HINT = "pass --region, set AWS_REGION (or AWS_DEFAULT_REGION), or set `region` in the AWS profile"


class TransientAWSError(AWSError):
    """Throttling, a 5xx or a dropped connection: worth retrying later."""


@lru_cache(maxsize=8)
def session(region: str | None = None, profile: str | None = None):
    import boto3

    try:
        return boto3.Session(region_name=region, profile_name=profile)
    except Exception as exc:  # botocore.exceptions.ProfileNotFound and friends
        raise AWSError(f"could not open an AWS session: {exc}", "check `aws configure list`") from None


def region_or_error(region: str | None, profile: str | None, what: str) -> str:
    """The region to use, from --region, the environment or the profile; exit 2 at once
    when none is set, naming the ways to set one."""
    region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    region = region or session(None, profile).region_name
    if not region:
        raise ConfigError([("--region", f"no AWS region is set to find {what} in")], NO_REGION_HINT)
    return region


def client(service: str, region: str | None = None, profile: str | None = None):
    from botocore.config import Config

    with translated(f"open a {service} client"):
        return session(region, profile).client(service, config=Config(retries=RETRY, user_agent_extra="sm-qlora"))


HINTS = {
    "AccessDenied": "the credentials lack a permission: see \"What the AWS account needs\" in the README",
    "AccessDeniedException": "the credentials lack a permission: see \"What the AWS account needs\" in the README",
    "ResourceLimitExceeded": "raise the instance quota (Service Quotas > SageMaker > '<instance> for training job usage') or pick another instance",
    "ThrottlingException": "AWS throttled the calls even after retries; try again in a minute",
    "ExpiredToken": "refresh your credentials (aws sso login, or new keys)",
    "ExpiredTokenException": "refresh your credentials (aws sso login, or new keys)",
    "UnrecognizedClientException": "the credentials are not valid for this account/region",
    "ValidationException": "SageMaker rejected a field of the request; run `sm-qlora launch --dry-run` to see it",
}
THROTTLING = {"Throttling", "ThrottlingException", "ThrottledException", "TooManyRequestsException",
              "RequestLimitExceeded", "SlowDown", "RequestThrottled", "ServiceUnavailable", "InternalFailure"}


def is_transient(exc: BaseException) -> bool:
    """A failure that a later retry may not see: throttling, a 5xx, a dropped connection."""
    from botocore.exceptions import ClientError, ConnectionError, HTTPClientError

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return exc.response.get("Error", {}).get("Code") in THROTTLING or status >= 500
    return isinstance(exc, (ConnectionError, HTTPClientError))


def is_not_found(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    msg = exc.response.get("Error", {}).get("Message", "").lower()
    return code in ("404", "NoSuchKey", "NotFound", "ResourceNotFound", "ResourceNotFoundException") or (
        code == "ValidationException" and ("not found" in msg or "could not find" in msg)
    )


@contextlib.contextmanager
def translated(action: str) -> Iterator[None]:
    """Run AWS calls; botocore failures become AWSError (exit 3) with a hint, and
    TransientAWSError for those worth retrying."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

    try:
        yield
    except NoCredentialsError:
        raise AWSError(f"{action}: no AWS credentials found",
                       "run `aws configure` or set AWS_PROFILE / AWS_ACCESS_KEY_ID") from None
    except NoRegionError:
        raise ConfigError([("--region", f"{action}: no AWS region is set")], NO_REGION_HINT) from None
    except ClientError as exc:
        err = exc.response.get("Error", {})
        code = err.get("Code", "Unknown")
        kind = TransientAWSError if is_transient(exc) else AWSError
        raise kind(f"{action}: {code}: {err.get('Message', exc)}", HINTS.get(code)) from None
    except BotoCoreError as exc:
        kind = TransientAWSError if is_transient(exc) else AWSError
        raise kind(f"{action}: {exc}", "check the network and the region") from None
    except Exception as exc:
        if not is_boto3_error(exc):
            raise
        # boto3's transfer manager wraps the ClientError in its own (S3UploadFailedError: a
        # missing bucket, a denied PutObject), which is no BotoCoreError
        raise AWSError(f"{action}: {exc}", "check that output.s3_uri's bucket exists in this account "
                       "and that the credentials may write to it") from None


def is_boto3_error(exc: BaseException) -> bool:
    """An error of boto3 itself (S3UploadFailedError, ...), told without importing boto3."""
    return type(exc).__module__.startswith("boto3.")


def split_s3(uri: str) -> tuple[str, str]:
    rest = uri[len("s3://"):]
    bucket, _, key = rest.partition("/")
    return bucket, key
