// A small JSON reader (RFC 8259 values; no writer): enough for config.json, generation_config.json,
// export_report.json and a safetensors header, without a dependency.
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace json {

class Value {
public:
    enum class Kind { Null, Bool, Number, String, Array, Object };

    Kind kind = Kind::Null;
    bool boolean = false;
    double number = 0.0;
    bool integral = false;  // the text was an integer (no '.', no exponent): `integer` holds it exactly
    int64_t integer = 0;
    std::string string;
    std::vector<Value> array;
    std::map<std::string, Value> object;

    bool is_null() const { return kind == Kind::Null; }
    bool is_integer() const { return kind == Kind::Number && integral; }
    bool is_string() const { return kind == Kind::String; }
    bool is_array() const { return kind == Kind::Array; }
    bool is_object() const { return kind == Kind::Object; }

    // The member `key` of an object, or nullptr (also when this is not an object).
    const Value* find(const std::string& key) const {
        if (kind != Kind::Object) return nullptr;
        auto it = object.find(key);
        return it == object.end() ? nullptr : &it->second;
    }
};

class ParseError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

namespace detail {

class Parser {
public:
    explicit Parser(const std::string& text) : text_(text) {}

    Value parse_document() {
        Value value = parse_value(0);
        skip_space();
        if (pos_ != text_.size()) fail("unexpected text after the value");
        return value;
    }

private:
    static constexpr int kMaxDepth = 256;
    const std::string& text_;
    size_t pos_ = 0;

    [[noreturn]] void fail(const std::string& what) const {
        throw ParseError(what + " at byte " + std::to_string(pos_));
    }

    void skip_space() {
        while (pos_ < text_.size() && (text_[pos_] == ' ' || text_[pos_] == '\t' || text_[pos_] == '\n' ||
                                       text_[pos_] == '\r'))
            ++pos_;
    }

    char peek() {
        skip_space();
        if (pos_ >= text_.size()) fail("unexpected end of input");
        return text_[pos_];
    }

    void expect_word(const char* word) {
        for (const char* c = word; *c; ++c, ++pos_)
            if (pos_ >= text_.size() || text_[pos_] != *c) fail(std::string("expected '") + word + "'");
    }

    Value parse_value(int depth) {
        if (depth > kMaxDepth) fail("nesting too deep");
        Value value;
        switch (peek()) {
            case '{': parse_object(value, depth); break;
            case '[': parse_array(value, depth); break;
            case '"': value.kind = Value::Kind::String; value.string = parse_string(); break;
            case 't': expect_word("true"); value.kind = Value::Kind::Bool; value.boolean = true; break;
            case 'f': expect_word("false"); value.kind = Value::Kind::Bool; break;
            case 'n': expect_word("null"); break;
            default: parse_number(value);
        }
        return value;
    }

    void parse_object(Value& value, int depth) {
        value.kind = Value::Kind::Object;
        ++pos_;  // '{'
        if (peek() == '}') { ++pos_; return; }
        while (true) {
            if (peek() != '"') fail("expected a string key");
            std::string key = parse_string();
            if (peek() != ':') fail("expected ':'");
            ++pos_;
            value.object[key] = parse_value(depth + 1);
            char c = peek();
            ++pos_;
            if (c == '}') return;
            if (c != ',') fail("expected ',' or '}'");
        }
    }

    void parse_array(Value& value, int depth) {
        value.kind = Value::Kind::Array;
        ++pos_;  // '['
        if (peek() == ']') { ++pos_; return; }
        while (true) {
            value.array.push_back(parse_value(depth + 1));
            char c = peek();
            ++pos_;
            if (c == ']') return;
            if (c != ',') fail("expected ',' or ']'");
        }
    }

    void parse_number(Value& value) {
        size_t start = pos_;
        if (text_[pos_] == '-') ++pos_;
        bool integral = true;
        auto digits = [&] {
            size_t from = pos_;
            while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
            if (pos_ == from) fail("expected a digit");
        };
        digits();
        if (pos_ < text_.size() && text_[pos_] == '.') { integral = false; ++pos_; digits(); }
        if (pos_ < text_.size() && (text_[pos_] == 'e' || text_[pos_] == 'E')) {
            integral = false;
            ++pos_;
            if (pos_ < text_.size() && (text_[pos_] == '+' || text_[pos_] == '-')) ++pos_;
            digits();
        }
        const std::string token = text_.substr(start, pos_ - start);
        value.kind = Value::Kind::Number;
        value.number = std::stod(token);
        if (integral) {
            try {
                value.integer = std::stoll(token);
                value.integral = true;
            } catch (const std::out_of_range&) {
                // beyond int64: a number, not an integer
            }
        }
    }

    static void append_utf8(std::string& out, uint32_t code) {
        if (code < 0x80) {
            out += static_cast<char>(code);
        } else if (code < 0x800) {
            out += static_cast<char>(0xC0 | (code >> 6));
            out += static_cast<char>(0x80 | (code & 0x3F));
        } else if (code < 0x10000) {
            out += static_cast<char>(0xE0 | (code >> 12));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        } else {
            out += static_cast<char>(0xF0 | (code >> 18));
            out += static_cast<char>(0x80 | ((code >> 12) & 0x3F));
            out += static_cast<char>(0x80 | ((code >> 6) & 0x3F));
            out += static_cast<char>(0x80 | (code & 0x3F));
        }
    }

    uint32_t parse_hex4() {
        if (pos_ + 4 > text_.size()) fail("truncated \\u escape");
        uint32_t code = 0;
        for (int i = 0; i < 4; ++i) {
            char c = text_[pos_++];
            code <<= 4;
            if (c >= '0' && c <= '9') code |= static_cast<uint32_t>(c - '0');
            else if (c >= 'a' && c <= 'f') code |= static_cast<uint32_t>(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') code |= static_cast<uint32_t>(c - 'A' + 10);
            else fail("bad \\u escape");
        }
        return code;
    }

    std::string parse_string() {
        ++pos_;  // '"'
        std::string out;
        while (true) {
            if (pos_ >= text_.size()) fail("unterminated string");
            char c = text_[pos_++];
            if (c == '"') return out;
            if (c != '\\') { out += c; continue; }
            if (pos_ >= text_.size()) fail("unterminated escape");
            char e = text_[pos_++];
            switch (e) {
                case '"': out += '"'; break;
                case '\\': out += '\\'; break;
                case '/': out += '/'; break;
                case 'b': out += '\b'; break;
                case 'f': out += '\f'; break;
                case 'n': out += '\n'; break;
                case 'r': out += '\r'; break;
                case 't': out += '\t'; break;
                case 'u': {
                    uint32_t code = parse_hex4();
                    if (code >= 0xD800 && code < 0xDC00 && pos_ + 6 <= text_.size() && text_[pos_] == '\\' &&
                        text_[pos_ + 1] == 'u') {  // a surrogate pair
                        pos_ += 2;
                        uint32_t low = parse_hex4();
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                    }
                    append_utf8(out, code);
                    break;
                }
                default: fail(std::string("bad escape \\") + e);
            }
        }
    }
};

}  // namespace detail

// Parse a whole JSON document; throws json::ParseError saying what and where.
inline Value parse(const std::string& text) { return detail::Parser(text).parse_document(); }

}  // namespace json
