import subprocess
import sys

HEAVY = ("timm", "coremltools", "tensorrt", "litert_torch", "ai_edge_litert", "transformers", "onnxruntime",
         "executorch")


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_import_slimx_loads_no_heavy_sdk():
    loaded = _loaded_after("import slimx")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)
    assert "torch" not in loaded


def test_stage_packages_and_cli_load_no_converter_or_model_zoo():
    loaded = _loaded_after("import slimx.cli, slimx.export, slimx.targets, slimx.devices, slimx.slim, slimx.quant")
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_user_folders_map_into_one_package():
    import slimx.devices
    import slimx.export
    import slimx.targets

    # ``slimx.export`` the attribute is the API's function; the subpackage is ``sys.modules["slimx.export"]``
    assert sys.modules["slimx.export"].__file__.replace("\\", "/").endswith("/export/__init__.py")
    assert slimx.devices.__file__.replace("\\", "/").endswith("/devices/__init__.py")
    assert slimx.targets.__file__.replace("\\", "/").endswith("/targets/__init__.py")


def test_api_names_stay_functions_after_their_namesake_modules_load():
    import slimx
    import slimx.evaluate
    import slimx.export
    import slimx.gate

    assert callable(slimx.export) and callable(slimx.evaluate) and callable(slimx.gate)
    assert slimx.export.__module__ == "slimx.api" and slimx.gate.__module__ == "slimx.api"
    from slimx.export import load_model  # the subpackage's names import as before

    assert callable(load_model)
