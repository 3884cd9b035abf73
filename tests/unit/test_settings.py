"""Settings: the specification's defaults, and a start-up error that names each bad variable."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import settings
from domain import GenerationLimits, PromptBuilder
from settings import ConfigurationError, Settings, get_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No variable of the host leaks into the settings, and get_settings() starts and ends uncached."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize(
    "field, expected",
    [
        ("device_type", "auto"),
        ("cpu_threads", 4),
        ("gpu_memory_fraction", 0.8),
        ("max_workers", 8),
        ("max_processes", 2),
        ("max_generation_time", 30),
        ("max_new_tokens", 10),
        ("generation_temperature", 0.1),
        ("max_memory_usage", 0.9),
        ("min_memory_gb", 2),
    ],
)
def test_defaults_are_the_specifications(field: str, expected: object) -> None:
    assert getattr(Settings(), field) == expected


def test_get_settings_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_NEW_TOKENS", "20")
    monkeypatch.setenv("CPU_THREADS", "2")

    configured = get_settings()

    assert configured.max_new_tokens == 20
    assert configured.cpu_threads == 2


def test_get_settings_is_cached() -> None:
    assert get_settings() is get_settings()


def test_variable_names_are_case_insensitive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("max_workers", "3")

    assert get_settings().max_workers == 3


@pytest.mark.parametrize("value, expected", [("CPU", "cpu"), (" cuda:1 ", "cuda:1"), ("mps", "mps"), ("cuda", "cuda")])
def test_device_type_is_normalized(monkeypatch: pytest.MonkeyPatch, value: str, expected: str) -> None:
    monkeypatch.setenv("DEVICE_TYPE", value)

    assert get_settings().device_type == expected


@pytest.mark.parametrize(
    "variable, value",
    [
        ("CPU_THREADS", "abc"),
        ("CPU_THREADS", "0"),
        ("GPU_MEMORY_FRACTION", "1.5"),
        ("GPU_MEMORY_FRACTION", "0"),
        ("DEVICE_TYPE", "tpu"),
        ("MAX_NEW_TOKENS", "-1"),
        ("GENERATION_TEMPERATURE", "2.5"),
        ("MAX_MEMORY_USAGE", "1.2"),
        ("MODEL_DTYPE", "int4"),
        ("QUANTIZATION", "int4"),
        ("LINEAR_KERNELS", "fastest"),
        ("DEFAULT_MODEL_ID", "Bad/Id"),
        ("RESPONSE_CACHE_SIZE", "-1"),
        ("RESPONSE_CACHE_TTL", "-5"),
        ("REDIS_URL", "http://redis:6379"),
        ("REDIS_URL", "redis-host:6379"),
        ("REDIS_TIMEOUT", "0"),
        ("API_KEYS_FILE", "/no/such/keys"),
        ("METRICS_REQUIRE_API_KEY", "maybe"),
        ("CORS_ORIGINS", "https://app.example/"),
        ("CORS_ORIGINS", "app.example"),
        ("CORS_ORIGINS", "https://app.example?x=1"),
    ],
)
def test_a_bad_value_stops_start_up_naming_the_variable_and_the_value(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    message = str(raised.value)
    assert message.startswith("invalid configuration: ")
    assert f"{variable}={value!r}" in message


def test_a_configuration_error_is_a_system_exit() -> None:
    assert issubclass(ConfigurationError, SystemExit)


def test_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CPU_THREADS", "abc")
    monkeypatch.setenv("DEVICE_TYPE", "tpu")

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert "CPU_THREADS='abc'" in str(raised.value)
    assert "DEVICE_TYPE='tpu'" in str(raised.value)


def test_a_bad_device_names_the_allowed_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEVICE_TYPE", "tpu")

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert settings.DEVICE_NAMES in str(raised.value)


def test_quantization_is_off_by_default_and_int8_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().quantization == "none"
    monkeypatch.setenv("QUANTIZATION", "int8")

    assert get_settings().quantization == "int8"


def test_a_bad_quantization_names_the_allowed_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QUANTIZATION", "fp8")

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert "QUANTIZATION='fp8'" in str(raised.value)
    assert "must be one of none, int8" in str(raised.value)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_int8_with_a_half_precision_dtype_stops_start_up(monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    monkeypatch.setenv("QUANTIZATION", "int8")
    monkeypatch.setenv("MODEL_DTYPE", dtype)

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert "QUANTIZATION='int8'" in str(raised.value)
    assert f"needs MODEL_DTYPE auto or float32, got {dtype!r}" in str(raised.value)


def test_generation_limits_come_from_the_settings() -> None:
    configured = Settings(max_new_tokens=7, generation_temperature=0.3, max_generation_time=12.5)

    assert configured.generation_limits == GenerationLimits(
        max_new_tokens=7, default_temperature=0.3, max_generation_time_s=12.5
    )


def test_the_prompt_builder_uses_the_system_prompt() -> None:
    builder = Settings(system_prompt="Be terse.").prompt_builder

    assert isinstance(builder, PromptBuilder)
    assert builder.build("q", []).messages[0].content == "Be terse."


def test_the_response_cache_is_in_process_unless_redis_is_named() -> None:
    configured = Settings()

    assert configured.redis_url is None
    assert configured.response_cache_size > 0 and configured.response_cache_ttl > 0


@pytest.mark.parametrize("value", ["redis://redis:6379/0", "rediss://:secret@cache.internal:6380/1", "unix:///run/redis.sock"])
def test_redis_url_takes_the_redis_schemes(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("REDIS_URL", value)

    assert get_settings().redis_url == value


def test_an_empty_redis_url_means_no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "")

    assert get_settings().redis_url is None


def keys_of(configured: Settings) -> list[str]:
    return [key.get_secret_value() for key in configured.accepted_api_keys]


def test_without_keys_the_api_is_open_and_has_no_cors() -> None:
    configured = Settings()

    assert configured.accepted_api_keys == () and configured.api_keys_file is None
    assert configured.metrics_require_api_key is True
    assert configured.cors_origins == ()


@pytest.mark.parametrize("value", ["", " ", " , "])
def test_api_keys_set_but_empty_stop_the_service_rather_than_open_it(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """An empty Secret, or a compose variable left blank, must not serve the API to anyone."""
    monkeypatch.setenv("API_KEYS", value)

    with pytest.raises(ConfigurationError, match=r"API_KEYS=<hidden>: .*holds no key: unset it"):
        get_settings()


def test_cors_origins_are_compared_in_lower_case_as_browsers_send_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://App.Example:8443")

    assert get_settings().cors_origins == ("https://app.example:8443",)


def test_api_keys_are_comma_separated_and_trimmed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", " first-key,second-key ,, first-key")

    assert keys_of(get_settings()) == ["first-key", "second-key"]


def test_the_keys_file_skips_blank_lines_and_comments_and_adds_to_api_keys(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the dashboard\nfile-key-1\n\n   \n  file-key-2  \n# rotated out: old-key\nsecond-key\n")
    monkeypatch.setenv("API_KEYS", "first-key,second-key")
    monkeypatch.setenv("API_KEYS_FILE", str(keys))

    configured = get_settings()

    assert keys_of(configured) == ["first-key", "second-key", "file-key-1", "file-key-2"]
    assert configured.api_keys_file.path == str(keys)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  \n"])
def test_a_keys_file_without_keys_stops_start_up_naming_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path, text: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(text)
    monkeypatch.setenv("API_KEYS_FILE", str(keys))

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert f"API_KEYS_FILE='{keys}'" in str(raised.value)
    assert f"the keys file {keys} holds no key" in str(raised.value)


def test_an_unreadable_keys_file_stops_start_up_naming_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("API_KEYS_FILE", str(tmp_path))  # a directory: it cannot be read as a file

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert f"cannot read the keys file {tmp_path}: " in str(raised.value)


def test_a_bad_key_stops_start_up_without_showing_any_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_KEYS", "good-secret,bad secret")

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    message = str(raised.value)
    assert message.startswith("invalid configuration: API_KEYS=<hidden>: ")
    assert "key 2 of 2 is not a usable key: a key is visible ASCII characters with no space" in message
    assert "secret" not in message


@pytest.mark.parametrize("bad_key", ["bad secret", "bad,secret"])  # a comma: API_KEYS could not give it
def test_a_bad_line_of_the_keys_file_is_named_by_its_number_not_its_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path, bad_key: str
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# keys\ngood-secret\n{bad_key}\n")
    monkeypatch.setenv("API_KEYS_FILE", str(keys))

    with pytest.raises(ConfigurationError) as raised:
        get_settings()

    assert f"line 3 of {keys} is not a usable key" in str(raised.value)
    assert "secret" not in str(raised.value).replace(str(keys), "")


def test_keys_never_show_in_the_settings_printed(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("file-secret\n")
    monkeypatch.setenv("API_KEYS", "env-secret")
    monkeypatch.setenv("API_KEYS_FILE", str(keys))

    configured = get_settings()

    for shown in (repr(configured), str(configured), configured.model_dump_json()):
        assert "env-secret" not in shown and "file-secret" not in shown


def test_metrics_can_be_left_open(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METRICS_REQUIRE_API_KEY", "false")

    assert get_settings().metrics_require_api_key is False


def test_cors_origins_are_comma_separated_and_take_any_origin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CORS_ORIGINS", "https://app.example, http://localhost:5173,*")

    assert get_settings().cors_origins == ("https://app.example", "http://localhost:5173", "*")
