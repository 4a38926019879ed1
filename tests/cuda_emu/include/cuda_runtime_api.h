// Host-emulation stand-in for the CUDA runtime API header (see ../emu.h).
#pragma once

struct CUstream_st;
typedef CUstream_st* cudaStream_t;
