{
  "targets": [
    {
      "target_name": "vdevkit",
      "sources": ["native/vdevkit.c"],
      "cflags": ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-O2"],
      "defines": ["NAPI_VERSION=8"]
    }
  ]
}
