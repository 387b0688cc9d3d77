// A minimal safetensors reader: one named tensor of a file, as raw bytes plus a to-float accessor.
//
// The format: an 8-byte little-endian header length N, N bytes of JSON
//   {"NAME": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {..}}
// then the raw little-endian data, offsets counted from the end of the header.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "json.hpp"

namespace safetensors {

class FormatError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

struct Tensor {
    std::string dtype;           // "F32", "F16" or "BF16"
    std::vector<int64_t> shape;  // row-major
    std::vector<unsigned char> data;

    size_t size() const {
        size_t n = 1;
        for (int64_t d : shape) n *= static_cast<size_t>(d);
        return n;
    }

    // Element i (row-major) as float; F16 and BF16 are widened exactly.
    float at(size_t i) const {
        if (dtype == "F32") {
            float value;
            std::memcpy(&value, data.data() + 4 * i, 4);
            return value;
        }
        uint16_t bits;
        std::memcpy(&bits, data.data() + 2 * i, 2);
        return dtype == "BF16" ? bf16_to_float(bits) : f16_to_float(bits);
    }

    static float bf16_to_float(uint16_t bits) {
        uint32_t wide = static_cast<uint32_t>(bits) << 16;
        float value;
        std::memcpy(&value, &wide, 4);
        return value;
    }

    static float f16_to_float(uint16_t bits) {
        uint32_t sign = static_cast<uint32_t>(bits & 0x8000) << 16;
        uint32_t exponent = (bits >> 10) & 0x1F;
        uint32_t fraction = bits & 0x3FF;
        uint32_t wide;
        if (exponent == 0x1F) {  // inf / nan
            wide = sign | 0x7F800000u | (fraction << 13);
        } else if (exponent != 0) {  // normal
            wide = sign | ((exponent + 112) << 23) | (fraction << 13);
        } else if (fraction == 0) {  // zero
            wide = sign;
        } else {  // subnormal: normalise
            exponent = 113;
            while (!(fraction & 0x400)) { fraction <<= 1; --exponent; }
            wide = sign | (exponent << 23) | ((fraction & 0x3FF) << 13);
        }
        float value;
        std::memcpy(&value, &wide, 4);
        return value;
    }
};

inline size_t item_size(const std::string& dtype) {
    if (dtype == "F32") return 4;
    if (dtype == "F16" || dtype == "BF16") return 2;
    return 0;  // not supported here
}

// The tensor `name` of the file at `path`. Throws FormatError saying what is wrong with the file.
inline Tensor read_tensor(const std::string& path, const std::string& name) {
    std::ifstream file(path, std::ios::binary | std::ios::ate);
    if (!file) throw FormatError("cannot open " + path);
    const uint64_t file_size = static_cast<uint64_t>(file.tellg());
    file.seekg(0);
    unsigned char length_bytes[8];
    if (file_size < 8 || !file.read(reinterpret_cast<char*>(length_bytes), 8))
        throw FormatError(path + " is not a safetensors file (shorter than its 8-byte header length)");
    uint64_t header_size = 0;
    for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | length_bytes[i];
    if (header_size > file_size - 8 || header_size > (100u << 20))
        throw FormatError(path + " is not a safetensors file (header length " + std::to_string(header_size) +
                          " for a file of " + std::to_string(file_size) + " bytes)");
    std::string header(header_size, '\0');
    file.read(header.data(), static_cast<std::streamsize>(header_size));

    json::Value root;
    try {
        root = json::parse(header);
    } catch (const json::ParseError& error) {
        throw FormatError(path + " has an unreadable safetensors header (" + error.what() + ")");
    }
    const json::Value* entry = root.find(name);
    if (entry == nullptr || !entry->is_object()) {
        std::string names;
        for (const auto& [key, value] : root.object)
            if (key != "__metadata__") names += (names.empty() ? "" : ", ") + key;
        throw FormatError(path + " holds [" + names + "]; expected a tensor named '" + name + "'");
    }
    const json::Value* dtype = entry->find("dtype");
    const json::Value* shape = entry->find("shape");
    const json::Value* offsets = entry->find("data_offsets");
    if (!dtype || !dtype->is_string() || !shape || !shape->is_array() || !offsets || !offsets->is_array() ||
        offsets->array.size() != 2 || !offsets->array[0].is_integer() || !offsets->array[1].is_integer())
        throw FormatError(path + ": tensor '" + name + "' lacks dtype, shape or data_offsets");

    Tensor tensor;
    tensor.dtype = dtype->string;
    if (item_size(tensor.dtype) == 0)
        throw FormatError(path + ": tensor '" + name + "' has dtype " + tensor.dtype + "; expected F32, F16 or BF16");
    for (const json::Value& dim : shape->array) {
        if (!dim.is_integer() || dim.integer < 0) throw FormatError(path + ": tensor '" + name + "' has a bad shape");
        tensor.shape.push_back(dim.integer);
    }
    const int64_t begin = offsets->array[0].integer, end = offsets->array[1].integer;
    const uint64_t data_size = file_size - 8 - header_size;
    if (begin < 0 || end < begin || static_cast<uint64_t>(end) > data_size ||
        static_cast<uint64_t>(end - begin) != tensor.size() * item_size(tensor.dtype))
        throw FormatError(path + ": tensor '" + name + "' has data_offsets [" + std::to_string(begin) + ", " +
                          std::to_string(end) + "] that do not fit its shape and dtype, or the file is truncated");
    tensor.data.resize(static_cast<size_t>(end - begin));
    file.seekg(static_cast<std::streamoff>(8 + header_size + static_cast<uint64_t>(begin)));
    if (!file.read(reinterpret_cast<char*>(tensor.data.data()), static_cast<std::streamsize>(tensor.data.size())))
        throw FormatError("could not read tensor '" + name + "' from " + path);
    return tensor;
}

}  // namespace safetensors
