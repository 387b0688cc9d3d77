// prefix_generate: greedy decoding of a prefix-export folder (decoder-only) with OpenVINO's C++ API.
//
//   prefix_generate OUT_DIR --token-ids 5,17,42 [--max-new-tokens 32] [--device CPU] [--precision f32]
//                   [--threads N]
//
// Prints the new token ids, space-separated, on one line of stdout; generation stops after an end
// token (generation_config.json's eos_token_id, else config.json's). Exit codes: 0 ok, 2 bad input or
// unsupported folder, 1 a failure while running (the runtime's message on stderr).
//
// What it reads from the folder (prefix_export/folder.py owns the format):
//   the graph            model.onnx (or the folder's only .onnx, or the one export_report.json names)
//   its metadata_props   prefix_export.layout ("folded" | "cache"), prefix_export.num_virtual_tokens (P)
//   prefix_kv.safetensors  one tensor `prefix_kv` (L, 2, H_kv, P, D): [:, 0] keys, [:, 1] values
//   generation_config.json / config.json  eos_token_id (an id or a list of ids)
//   export_report.json   the position-table size (learned positions) and whether it is seq2seq
//
// How each layout is fed (prefix_export/runtime/loop.py's DecoderStepper, batch 1):
//   folded  the prefix is inside the graph. The first past is empty, (1, H_kv, 0, D) per tensor; the
//           mask covers the user's tokens; positions count from 0.
//   cache   the graph is the plain base decoder. The first past is the prefix, (1, H_kv, P, D) per
//           tensor; the mask covers P + the user's tokens; positions count from P.
// In both, a step's present.{i}.key/value (1, H_kv, past + seq, D) is the next step's
// past_key_values.{i}.key/value, and position_ids = past length + [0, seq).
//
// OpenVINO's CPU plugin computes in bf16 on CPUs with bf16 support unless INFERENCE_PRECISION_HINT says
// otherwise, and greedy tokens then drift from float32 runtimes; --precision defaults to f32.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include <openvino/openvino.hpp>

#include "json.hpp"
#include "safetensors.hpp"

namespace fs = std::filesystem;

namespace {

// Something the user can fix: bad arguments, a folder that is not a decoder-only export (exit 2).
class InputError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// A bad command line (exit 2, with the usage line).
class UsageError : public InputError {
public:
    using InputError::InputError;
};

// File and key names of the export format (prefix_export/folder.py, contract.py).
constexpr const char* kGraphFile = "model.onnx";
constexpr const char* kPrefixFile = "prefix_kv.safetensors";
constexpr const char* kPrefixTensor = "prefix_kv";
constexpr const char* kReportFile = "export_report.json";
constexpr const char* kEncoderGraph = "encoder_model.onnx";
constexpr const char* kDecoderGraph = "decoder_model.onnx";
constexpr const char* kMetaLayout = "prefix_export.layout";
constexpr const char* kMetaPrefixLength = "prefix_export.num_virtual_tokens";

std::string past_name(size_t layer, const char* kind) {
    return "past_key_values." + std::to_string(layer) + "." + kind;
}
std::string present_name(size_t layer, const char* kind) {
    return "present." + std::to_string(layer) + "." + kind;
}

// ---- the export folder: which files, and what its JSON files say ------------------------------------

class ExportFolder {
public:
    explicit ExportFolder(fs::path path) : path_(std::move(path)) {
        if (!fs::is_directory(path_))
            throw InputError(path_.string() + " is not a folder; expected an export folder written by prefix-export");
        report_ = read_json(kReportFile);
        config_ = read_json("config.json");
        generation_config_ = read_json("generation_config.json");
        refuse_seq2seq();
        graph_ = find_graph();
    }

    const fs::path& path() const { return path_; }
    const fs::path& graph() const { return graph_; }
    fs::path prefix_file() const { return path_ / kPrefixFile; }

    // End-of-sequence ids: generation_config.json's eos_token_id, else config.json's (an id or a list).
    std::vector<int64_t> eos_token_ids() const {
        for (const json::Value* source : {&generation_config_, &config_}) {
            const json::Value* eos = source->find("eos_token_id");
            if (eos == nullptr || eos->is_null()) continue;
            std::vector<int64_t> ids;
            if (eos->is_integer()) ids.push_back(eos->integer);
            for (const json::Value& id : eos->array)
                if (id.is_integer()) ids.push_back(id.integer);
            return ids;
        }
        return {};
    }

    // Rows of a learned position table (the report's architecture), else none; without a report,
    // config.json's n_positions (what ExportFolder.max_positions says in Python).
    std::optional<int64_t> max_positions() const {
        if (const json::Value* arch = report_.find("architecture"); arch && arch->is_object()) {
            const json::Value* positions = arch->find("positions");
            const json::Value* rows = arch->find("max_positions");
            if (positions && positions->is_string() && positions->string == "learned" && rows && rows->is_integer())
                return rows->integer;
            return std::nullopt;
        }
        if (const json::Value* rows = config_.find("n_positions"); rows && rows->is_integer()) return rows->integer;
        return std::nullopt;
    }

private:
    fs::path path_;
    fs::path graph_;
    json::Value report_, config_, generation_config_;

    json::Value read_json(const std::string& name) const {
        const fs::path file = path_ / name;
        if (!fs::is_regular_file(file)) return {};
        std::ifstream in(file, std::ios::binary);
        std::stringstream text;
        text << in.rdbuf();
        if (!in) throw InputError("cannot read " + file.string());
        try {
            return json::parse(text.str());
        } catch (const json::ParseError& error) {
            throw InputError(file.string() + " is not valid JSON (" + error.what() + ")");
        }
    }

    void refuse_seq2seq() const {
        const json::Value* graph = report_.find("graph");
        const bool parts = graph && graph->find("parts");
        if (parts || (fs::is_regular_file(path_ / kEncoderGraph) && fs::is_regular_file(path_ / kDecoderGraph)))
            throw InputError(path_.string() + " is an encoder-decoder (seq2seq) export (" + kEncoderGraph + " + " +
                             kDecoderGraph + "); prefix_generate runs decoder-only exports. Run it with "
                             "`prefix-export generate` (Python) instead.");
    }

    // model.onnx; else the graph the report names; else the folder's only .onnx file.
    fs::path find_graph() const {
        if (fs::is_regular_file(path_ / kGraphFile)) return path_ / kGraphFile;
        if (report_.is_object()) {
            std::string name = kGraphFile;
            if (const json::Value* graph = report_.find("graph"))
                if (const json::Value* file = graph->find("graph"); file && file->is_string()) name = file->string;
            if (!fs::is_regular_file(path_ / name))
                throw InputError(path_.string() + ": the graph " + name + " that " + kReportFile +
                                 " lists is missing; copy the whole export folder");
            return path_ / name;
        }
        std::vector<std::string> graphs;
        for (const auto& entry : fs::directory_iterator(path_))
            if (entry.is_regular_file() && entry.path().extension() == ".onnx")
                graphs.push_back(entry.path().filename().string());
        if (graphs.size() != 1) {
            std::string found;
            for (const std::string& g : graphs) found += (found.empty() ? "" : ", ") + g;
            throw InputError(path_.string() + " is not an export folder: expected " + kGraphFile + " (or one .onnx "
                             "graph) in it, found " + (found.empty() ? "none" : found));
        }
        return path_ / graphs[0];
    }
};

// ---- the decoder graph on OpenVINO --------------------------------------------------------------------

struct RunOptions {
    std::string device = "CPU";
    std::string precision = "f32";  // INFERENCE_PRECISION_HINT: f32, bf16 or f16
    int threads = 0;                // 0: the device's default
};

ov::element::Type precision_type(const std::string& name) {
    if (name == "f32") return ov::element::f32;
    if (name == "bf16") return ov::element::bf16;
    if (name == "f16") return ov::element::f16;
    throw UsageError("--precision " + name + ": expected f32, bf16 or f16");
}

// Element i of a float tensor (f32, f16 or bf16) as float.
float float_at(const ov::Tensor& tensor, size_t i) {
    const ov::element::Type type = tensor.get_element_type();
    if (type == ov::element::f32) return tensor.data<const float>()[i];
    if (type == ov::element::f16) return static_cast<float>(tensor.data<const ov::float16>()[i]);
    if (type == ov::element::bf16) return static_cast<float>(tensor.data<const ov::bfloat16>()[i]);
    throw std::runtime_error("unexpected element type " + type.get_type_name());
}

void set_float(ov::Tensor& tensor, size_t i, float value) {
    const ov::element::Type type = tensor.get_element_type();
    if (type == ov::element::f32) tensor.data<float>()[i] = value;
    else if (type == ov::element::f16) tensor.data<ov::float16>()[i] = ov::float16(value);
    else if (type == ov::element::bf16) tensor.data<ov::bfloat16>()[i] = ov::bfloat16(value);
    else throw std::runtime_error("unexpected element type " + type.get_type_name());
}

ov::Tensor int64_tensor(const std::vector<int64_t>& values) {
    ov::Tensor tensor(ov::element::i64, {1, values.size()});
    std::copy(values.begin(), values.end(), tensor.data<int64_t>());
    return tensor;
}

class OpenVinoDecoder {
public:
    OpenVinoDecoder(const ExportFolder& folder, const RunOptions& options) {
        std::shared_ptr<ov::Model> model = core_.read_model(folder.graph().string());
        read_contract(*model, folder);
        ov::AnyMap config{ov::hint::inference_precision(precision_type(options.precision))};
        if (options.threads > 0) config.emplace(ov::inference_num_threads(options.threads));
        compiled_ = core_.compile_model(model, options.device, config);
        request_ = compiled_.create_infer_request();
        if (layout_ == "cache") prefix_ = read_prefix(folder.prefix_file());
    }

    const std::string& layout() const { return layout_; }
    int64_t num_virtual_tokens() const { return num_virtual_tokens_; }
    int64_t vocab_size() const { return vocab_size_; }

    // Greedy tokens: at most max_new_tokens, ending after the first of `eos` when one is generated.
    std::vector<int64_t> generate(const std::vector<int64_t>& prompt, int max_new_tokens,
                                  const std::vector<int64_t>& eos) {
        std::vector<ov::Tensor> past = first_past();  // contract order: layer 0 key, layer 0 value, ...
        size_t past_length = past.front().get_shape()[2];  // 0 (folded) or P (cache)
        std::vector<int64_t> tokens = prompt;
        std::vector<int64_t> generated;
        for (int step = 0; step < max_new_tokens; ++step) {
            const size_t total = past_length + tokens.size();
            std::vector<int64_t> positions(tokens.size());
            for (size_t i = 0; i < positions.size(); ++i) positions[i] = static_cast<int64_t>(past_length + i);
            request_.set_tensor("input_ids", int64_tensor(tokens));
            request_.set_tensor("attention_mask", int64_tensor(std::vector<int64_t>(total, 1)));
            request_.set_tensor("position_ids", int64_tensor(positions));
            for (size_t k = 0; k < past_names_.size(); ++k) {
                request_.set_tensor(past_names_[k], past[k]);
                // a fresh output per step: this step's presents become the next step's pasts, untouched
                request_.set_tensor(present_names_[k], ov::Tensor(kv_type_, {1, num_kv_heads_, total, head_dim_}));
            }
            request_.infer();
            const int64_t next = argmax_last(request_.get_tensor("logits"));  // logits (1, seq, V)
            generated.push_back(next);
            if (std::find(eos.begin(), eos.end(), next) != eos.end()) break;
            for (size_t k = 0; k < past_names_.size(); ++k) past[k] = request_.get_tensor(present_names_[k]);
            past_length = total;
            tokens.assign(1, next);
        }
        return generated;
    }

private:
    ov::Core core_;
    ov::CompiledModel compiled_;
    ov::InferRequest request_;
    std::string layout_;
    int64_t num_virtual_tokens_ = 0;
    int64_t vocab_size_ = 0;
    size_t num_layers_ = 0, num_kv_heads_ = 0, head_dim_ = 0;
    ov::element::Type kv_type_;
    std::vector<std::string> past_names_, present_names_;
    std::vector<ov::Tensor> prefix_;  // cache layout: (1, H_kv, P, D) per past, contract order

    static std::string metadata(const ov::Model& model, const char* key) {
        if (!model.has_rt_info("framework", key)) return {};
        return model.get_rt_info<std::string>("framework", key);
    }

    // Layout, P, the cache's names and shape, from the graph itself (what OnnxDecoder reads in Python).
    void read_contract(const ov::Model& model, const ExportFolder& folder) {
        const std::string graph = folder.graph().string();
        const std::string prefix_length = metadata(model, kMetaPrefixLength);
        if (prefix_length.empty())
            throw InputError(graph + " has no '" + kMetaPrefixLength + "' metadata; it was not written by "
                             "prefix-export. Expected an export folder (model.onnx, " + kPrefixFile + ", " +
                             kReportFile + ")");
        if (prefix_length.find_first_not_of("0123456789") != std::string::npos || prefix_length.size() > 9)
            throw InputError(graph + ": metadata " + kMetaPrefixLength + " is '" + prefix_length +
                             "'; expected a non-negative integer");
        num_virtual_tokens_ = std::stoll(prefix_length);
        layout_ = metadata(model, kMetaLayout);
        if (layout_.empty()) layout_ = "folded";
        if (layout_ != "folded" && layout_ != "cache")
            throw InputError(graph + " has layout '" + layout_ + "'; expected folded or cache");

        std::vector<std::string> inputs;
        for (const ov::Output<const ov::Node>& input : model.inputs()) inputs.push_back(input.get_any_name());
        for (const char* required : {"input_ids", "attention_mask", "position_ids"})
            if (std::find(inputs.begin(), inputs.end(), required) == inputs.end())
                throw InputError(graph + " lacks the input " + required + "; it was not exported by prefix-export");
        while (std::find(inputs.begin(), inputs.end(), past_name(num_layers_, "key")) != inputs.end()) ++num_layers_;
        if (num_layers_ == 0) throw InputError(graph + " has no past_key_values.0.key input; it is not a decoder "
                                               "exported with a KV cache by prefix-export");
        for (size_t i = 0; i < num_layers_; ++i)
            for (const char* kind : {"key", "value"}) {
                past_names_.push_back(past_name(i, kind));
                present_names_.push_back(present_name(i, kind));
            }
        const ov::Output<const ov::Node> first = model.input(past_names_.front());
        const ov::PartialShape& shape = first.get_partial_shape();  // (batch, H_kv, past, D)
        if (shape.rank().is_dynamic() || shape.rank().get_length() != 4 || shape[1].is_dynamic() ||
            shape[3].is_dynamic())
            throw InputError(graph + ": " + past_names_.front() + " has shape " + shape.to_string() +
                             "; expected (batch_size, H_kv, past_sequence_length, D) with fixed H_kv and D");
        num_kv_heads_ = static_cast<size_t>(shape[1].get_length());
        head_dim_ = static_cast<size_t>(shape[3].get_length());
        kv_type_ = first.get_element_type();
        const ov::PartialShape& logits = model.output("logits").get_partial_shape();  // (batch, seq, V)
        if (logits.rank().is_static() && logits.rank().get_length() == 3 && logits[2].is_static())
            vocab_size_ = logits[2].get_length();
    }

    // prefix_kv.safetensors (L, 2, H_kv, P, D) -> one (1, H_kv, P, D) tensor per past, in the KV dtype.
    std::vector<ov::Tensor> read_prefix(const fs::path& file) const {
        if (!fs::is_regular_file(file))
            throw InputError(file.string() + " is missing; a cache-layout export feeds it as the first past (copy "
                             "the whole export folder)");
        safetensors::Tensor prefix;
        try {
            prefix = safetensors::read_tensor(file.string(), kPrefixTensor);
        } catch (const safetensors::FormatError& error) {
            throw InputError(error.what());
        }
        const std::vector<int64_t> want{static_cast<int64_t>(num_layers_), 2, static_cast<int64_t>(num_kv_heads_),
                                        num_virtual_tokens_, static_cast<int64_t>(head_dim_)};
        if (prefix.shape != want) {
            auto text = [](const std::vector<int64_t>& s) {
                std::string out;
                for (int64_t d : s) out += (out.empty() ? "(" : ", ") + std::to_string(d);
                return out + ")";
            };
            throw InputError(file.string() + " holds a prefix of shape " + text(prefix.shape) +
                             " (L, 2, H_kv, P, D); the graph needs " + text(want));
        }
        const size_t block = num_kv_heads_ * static_cast<size_t>(num_virtual_tokens_) * head_dim_;  // (H_kv, P, D)
        std::vector<ov::Tensor> past;
        for (size_t k = 0; k < past_names_.size(); ++k) {  // k = 2 * layer + (0 key | 1 value): prefix[layer, kind]
            ov::Tensor tensor(kv_type_, {1, num_kv_heads_, static_cast<size_t>(num_virtual_tokens_), head_dim_});
            for (size_t i = 0; i < block; ++i) set_float(tensor, i, prefix.at(k * block + i));
            past.push_back(tensor);
        }
        return past;
    }

    // The first step's past: empty (folded) or a copy of the prefix (cache), so that runs do not share it.
    std::vector<ov::Tensor> first_past() const {
        std::vector<ov::Tensor> past;
        for (size_t k = 0; k < past_names_.size(); ++k) {
            if (layout_ == "folded") {
                past.emplace_back(kv_type_, ov::Shape{1, num_kv_heads_, 0, head_dim_});
            } else {
                ov::Tensor copy(prefix_[k].get_element_type(), prefix_[k].get_shape());
                prefix_[k].copy_to(copy);
                past.push_back(copy);
            }
        }
        return past;
    }

    // Index of the largest logit of the last position (the first one on ties, like numpy's argmax).
    static int64_t argmax_last(const ov::Tensor& logits) {
        const ov::Shape shape = logits.get_shape();
        const size_t vocab = shape[2], offset = (shape[1] - 1) * vocab;
        size_t best = 0;
        float best_value = float_at(logits, offset);
        for (size_t i = 1; i < vocab; ++i) {
            const float value = float_at(logits, offset + i);
            if (value > best_value) {
                best_value = value;
                best = i;
            }
        }
        return static_cast<int64_t>(best);
    }
};

// ---- the command line -----------------------------------------------------------------------------

struct Arguments {
    fs::path folder;
    std::vector<int64_t> token_ids;
    int max_new_tokens = 32;
    RunOptions run;
    bool help = false;
};

const char* kUsage =
    "usage: prefix_generate OUT_DIR --token-ids 1,2,3 [--max-new-tokens N] [--device CPU] [--precision f32|bf16|f16] "
    "[--threads N]";

std::vector<int64_t> parse_token_ids(const std::string& text) {
    std::vector<int64_t> ids;
    std::string item;
    std::stringstream stream(text);
    bool ok = !text.empty();
    while (ok && std::getline(stream, item, ',')) {
        ok = !item.empty() && item.size() <= 18 &&
             std::all_of(item.begin(), item.end(), [](char c) { return c >= '0' && c <= '9'; });
        if (ok) ids.push_back(std::stoll(item));
    }
    if (!ok || ids.empty() || text.back() == ',')
        throw UsageError("--token-ids \"" + text + "\": expected comma-separated non-negative integers, e.g. 5,17,42");
    return ids;
}

int parse_positive(const std::string& flag, const std::string& text) {
    const bool digits = !text.empty() && text.size() <= 9 &&
                        std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (!digits || std::stoi(text) < 1) throw UsageError(flag + " \"" + text + "\": expected a positive integer");
    return std::stoi(text);
}

Arguments parse_arguments(int argc, char** argv) {
    Arguments args;
    bool have_folder = false, have_ids = false;
    for (int i = 1; i < argc; ++i) {
        const std::string arg = argv[i];
        auto value = [&]() -> std::string {
            if (i + 1 >= argc) throw UsageError(arg + " needs a value");
            return argv[++i];
        };
        if (arg == "--token-ids") { args.token_ids = parse_token_ids(value()); have_ids = true; }
        else if (arg == "--max-new-tokens") args.max_new_tokens = parse_positive(arg, value());
        else if (arg == "--device") args.run.device = value();
        else if (arg == "--precision") { args.run.precision = value(); precision_type(args.run.precision); }
        else if (arg == "--threads") args.run.threads = parse_positive(arg, value());
        else if (arg == "-h" || arg == "--help") { args.help = true; return args; }
        else if (arg.rfind("-", 0) == 0) throw UsageError("unknown option " + arg);
        else if (!have_folder) { args.folder = arg; have_folder = true; }
        else throw UsageError("unexpected argument " + arg);
    }
    if (!have_folder) throw UsageError("OUT_DIR (an export folder) is required");
    if (!have_ids) throw UsageError("--token-ids is required (the prompt's token ids, e.g. 5,17,42)");
    return args;
}

// Prompt and position-table checks before anything runs (runtime/generate.py's check_lengths).
void check_prompt(const Arguments& args, const ExportFolder& folder, const OpenVinoDecoder& decoder) {
    for (int64_t id : args.token_ids)
        if (decoder.vocab_size() > 0 && id >= decoder.vocab_size())
            throw InputError("--token-ids: " + std::to_string(id) + " is not below the vocabulary size " +
                             std::to_string(decoder.vocab_size()));
    if (const std::optional<int64_t> rows = folder.max_positions()) {
        const int64_t P = decoder.num_virtual_tokens();
        const int64_t needed = P + static_cast<int64_t>(args.token_ids.size()) + args.max_new_tokens;
        if (needed > *rows)
            throw InputError("the prompt has " + std::to_string(args.token_ids.size()) + " tokens; with the prefix's P=" +
                             std::to_string(P) + " positions and " + std::to_string(args.max_new_tokens) +
                             " new tokens that needs " + std::to_string(needed) + " positions, but the model has " +
                             std::to_string(*rows) + "; shorten the prompt or lower --max-new-tokens");
    }
}

}  // namespace

int main(int argc, char** argv) {
    try {
        const Arguments args = parse_arguments(argc, argv);
        if (args.help) {
            std::cout << kUsage << "\n";
            return 0;
        }
        const ExportFolder folder(args.folder);
        OpenVinoDecoder decoder(folder, args.run);
        check_prompt(args, folder, decoder);
        const std::vector<int64_t> tokens = decoder.generate(args.token_ids, args.max_new_tokens,
                                                             folder.eos_token_ids());
        for (size_t i = 0; i < tokens.size(); ++i) std::cout << (i ? " " : "") << tokens[i];
        std::cout << std::endl;
        return 0;
    } catch (const UsageError& error) {
        std::cerr << "prefix_generate: " << error.what() << "\n" << kUsage << "\n";
        return 2;
    } catch (const InputError& error) {
        std::cerr << "prefix_generate: " << error.what() << "\n";
        return 2;
    } catch (const std::exception& error) {
        std::cerr << "prefix_generate: " << error.what() << "\n";
        return 1;
    }
}
