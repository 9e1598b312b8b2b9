"""Run by bench/kserve_sdk.py in a venv with kserve: v2 (OIP) and v1 (TF Serving) through InferenceRESTClient.

    client.py BASE_URL MODEL API_KEY IMAGES.npy   -> one JSON line on stdout

Each call gets a fresh headers dict: the SDK adds its binary-data headers to the dict it is given.
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig


async def main(base: str, model: str, key: str, images: np.ndarray) -> dict:
    def auth() -> dict:
        return {"Authorization": f"Bearer {key}"}

    def request(binary: bool) -> InferRequest:
        tensor = InferInput(name="image", shape=list(images.shape), datatype="UINT8")
        tensor.set_data_from_numpy(images, binary_data=binary)
        return InferRequest(model_name=model, infer_inputs=[tensor])

    out: dict = {}
    async with InferenceRESTClient(RESTConfig(protocol="v2", retries=1, timeout=60)) as client:
        out["server_live"] = await client.is_server_live(base, headers=auth())
        out["server_ready"] = await client.is_server_ready(base, headers=auth())
        out["model_ready"] = await client.is_model_ready(base, model, headers=auth())
        for name, binary in (("v2_binary", True), ("v2_json", False)):
            res = await client.infer(base, request(binary), model_name=model, headers=auth())
            out[name] = {o.name: o.as_numpy().tolist() for o in res.outputs}
        plain = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "UINT8",
                             "data": images.reshape(-1).tolist()}]}
        res = await client.infer(base, plain, model_name=model, headers=auth())
        out["v2_dict"] = res.outputs[0].name
    async with InferenceRESTClient(RESTConfig(protocol="v1", retries=1, timeout=60)) as client:
        res = await client.infer(base, {"instances": images.tolist()}, model_name=model, headers=auth())
        out["v1_predictions"] = res["predictions"]
    return out


if __name__ == "__main__":
    base_url, model_name, api_key, path = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(base_url, model_name, api_key, np.load(path)))))
