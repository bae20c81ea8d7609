"""SELFIE_LORA_STORAGE_URL is ``s3://bucket/prefix`` and nothing else: anything more is a
settings error in one line naming the setting, never one that repeats a key put in the URL, and
the forms README documents still load."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from selfie_lora.adapters.storage.s3 import S3Location
from selfie_lora.config import Settings, settings_errors
from selfie_lora.errors import ConfigError

SECRET = "wJalrSECRETKEY"


@pytest.mark.parametrize(("url", "said"), [
    (f"s3://AKIAEXAMPLE:{SECRET}@selfie-test/prod", "holds credentials before the bucket"),
    ("s3://AKIAEXAMPLE@selfie-test/prod", "holds credentials before the bucket"),
    ("s3://selfie-test:9000/pre", "has a port after the bucket"),
    ("s3://selfie-test/pre?x=1", "has a query"),
    ("s3://selfie-test/pre#frag", "has a query (?...) or a fragment"),
    ("s3://selfie-test/pre\tfix", "holds a control character"),
    ("s3://selfie-test/pre\nfix", "holds a control character"),
    ("s3://selfie-test/a//b", "has an empty, '.' or '..' part"),
    ("s3://selfie-test/a/./b", "has an empty, '.' or '..' part"),
    ("s3://selfie-test/a/../b", "has an empty, '.' or '..' part"),
    ("s3://Selfie-Test/prod", "names no valid bucket"),
    ("s3://se/prod", "names no valid bucket"),
    ("s3://selfie_test/prod", "names no valid bucket"),
    ("s3://-selfie/prod", "names no valid bucket"),
    ("s3://selfie..test/prod", "names no valid bucket"),
    ("s3://192.168.1.10/prod", "names no valid bucket"),
    (f"s3://{'a' * 64}/prod", "names no valid bucket"),
    ("s3://", "names no bucket"),
    ("s3:///prod", "names no bucket"),
    ("https://selfie-test/prod", "must be unset (files under HOME) or s3://bucket/prefix"),
])
def test_a_storage_url_that_is_not_s3_bucket_prefix_is_refused_in_one_line(
        url: str, said: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Settings(storage_url=url)
    lines = settings_errors(caught.value)
    assert len(lines) == 1, lines
    assert lines[0].startswith("SELFIE_LORA_STORAGE_URL: "), lines
    assert said in lines[0], lines
    assert "\n" not in lines[0]
    assert SECRET not in lines[0]
    assert "AKIAEXAMPLE" not in lines[0]
    if "credentials" in said:
        assert "AWS_SECRET_ACCESS_KEY" in lines[0]  # says where keys go
    # The store, built without the settings (tests, tools), refuses it alike.
    with pytest.raises(ConfigError) as refused:
        S3Location.parse(url)
    assert said in str(refused.value)
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(("url", "bucket", "prefix"), [
    ("s3://selfie-lora/prod", "selfie-lora", "prod"),  # README's examples
    ("s3://selfie-lora/staging", "selfie-lora", "staging"),
    ("s3://selfie-lora", "selfie-lora", ""),
    ("s3://selfie-lora/", "selfie-lora", ""),
    ("s3://selfie-lora/prod/", "selfie-lora", "prod"),  # a trailing slash
    ("s3://my.bucket-1/a/b c/é", "my.bucket-1", "a/b c/é"),  # spaces, unicode
    ("s3://production-bucket/loras", "production-bucket", "loras"),
])
def test_the_documented_forms_load(url: str, bucket: str, prefix: str) -> None:
    assert Settings(storage_url=url).storage_url == url
    assert S3Location.parse(url) == S3Location(bucket=bucket, prefix=prefix)
