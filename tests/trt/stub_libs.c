/* Stand-ins for the nine TensorRT entry points NVIDIA's Python bindings link against.
 *
 * Compiled by tests/trt/trt_bindings.py as libnvinfer.so.N, libnvonnxparser.so.N and libnvinfer_plugin.so.N
 * so that `import tensorrt_bindings` succeeds without TensorRT: every factory returns NULL (the bindings
 * then raise "factory function returned nullptr"), every query returns 0. Nothing here is NVIDIA code.
 */
#include <stddef.h>

void *createInferBuilder_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRuntime_INTERNAL(void *logger, int version) { return NULL; }
void *createInferRefitter_INTERNAL(void *engine, void *logger, int version) { return NULL; }
void *createNvOnnxParser_INTERNAL(void *network, void *logger, int version) { return NULL; }
void *createNvOnnxParserRefitter_INTERNAL(void *refitter, void *logger, int version) { return NULL; }
void *getBuilderPluginRegistry(int capability) { return NULL; }
int getNvOnnxParserVersion(void) { return 0; }
void *getPluginRegistry(void) { return NULL; }
int initLibNvInferPlugins(void *logger, const char *ns) { return 0; }
