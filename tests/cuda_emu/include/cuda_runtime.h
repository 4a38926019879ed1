// Host-emulation stand-in for cuda_runtime.h: the device-side names, from ../emu.h.
#pragma once

#include "cuda_runtime_api.h"
#include "../emu.h"
