// uws-peer: a uWebSockets server that speaks the subset of ringcast's relay
// protocol used by ringcast-load, so loadtest/compare.sh can run it beside
// ringcast (peer `uws`; see README.md in this directory). Only this app is in
// the repository: uWebSockets and uSockets are built from a local copy of
// their public repositories (uWebSockets v20.79.0 and the uSockets commit it
// pins); this file only includes their headers and calls their API.
//
//   uws-peer PORT [--compression] [--compression-min-bytes N] [--prepared]
//
// Single-threaded uWS App (uSockets' default epoll backend, no TLS) on
// 127.0.0.1:PORT:
//   GET  /ws       WebSocket: subscribe / unsubscribe / ping / message (publish)
//   POST /publish  {"topic":T,"event"?:E,"payload"?:P,"message"?:"S"} -> 202
//   GET  /health   200 {"status":"ok"}
// Push frames are byte-for-byte what ringcast sends for the same publish:
//   {"type":"push","topic":T,"event":E,"payload":P}
// T and E re-escaped as serde_json does, P copied as raw JSON text.
//
// Every HTTP response is written inside res->cork(...), the idiom uWS documents
// for efficient sends (misc/READMORE.md, "Corking"). Fan-out uses app.publish
// (uWS's topic tree: queued, then sent to each subscriber at the end of the
// loop iteration); --prepared switches to Loop::prepareMessage +
// App::publishPrepared (compressed once per publish, uWS marks it experimental).
// Options: --compression (SHARED_COMPRESSOR on /ws, pushes published with
// compress = true), --compression-min-bytes N (pushes under N bytes go plain;
// 256 is ringcast's default compression_min_bytes), --prepared (implies
// --compression). compare.sh starts it with the port only (no compression).
//
// Build by hand (README.md has the steps), with $UWS_SRC a clone of
// uNetworking/uWebSockets at v20.79.0 and uNetworking/uSockets at the commit it
// pins (86097c4) in $UWS_SRC/uSockets. In $UWS_SRC/uSockets (its Makefile's
// default target with -O2 -march=native for -O3 -flto):
//   rm -f *.o uSockets.a
//   cc -DLIBUS_NO_SSL -std=c11 -Isrc -O2 -march=native -c src/*.c src/eventing/*.c src/crypto/*.c src/io_uring/*.c
//   ar rvs uSockets.a *.o
// then in the repository root:
//   g++ -std=c++20 -O2 -march=native -DLIBUS_NO_SSL -I$UWS_SRC/src -I$UWS_SRC/uSockets/src loadtest/peers/uws/server.cpp $UWS_SRC/uSockets/uSockets.a -lz -o uws-peer
//   UWS_BIN=$PWD/uws-peer PEERS="ringcast uws" loadtest/compare.sh

#include "App.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace {

// ---------------------------------------------------------------- options

struct Options {
    int port = 0;
    bool compression = false;          // SHARED_COMPRESSOR on /ws
    size_t compressionMinBytes = 0;    // frames shorter than this go uncompressed (0: uWS default, compress all)
    bool prepared = false;             // compress once per publish (Loop::prepareMessage + publishPrepared)
};
Options opts;

constexpr size_t MAX_NAME_BYTES = 256;       // ringcast's default topic/event bound
constexpr size_t MAX_BODY_BYTES = 1 << 20;   // ringcast's default max_body_bytes
constexpr int MAX_DEPTH = 128;               // ringcast's MAX_PAYLOAD_DEPTH

// ---------------------------------------------------------------- JSON

// A minimal, validating JSON reader for one top-level object: each member
// value is kept as its raw text (no surrounding whitespace, like serde_json's
// RawValue); strings we need are decoded on demand.
struct Reader {
    const char *p, *end;
    const char *err = nullptr;

    bool fail(const char *why) { if (!err) err = why; return false; }
    void ws() { while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')) ++p; }

    static int hex(char c) {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    }
    bool hex4(unsigned &v) {
        if (end - p < 4) return fail("bad \\u escape");
        v = 0;
        for (int i = 0; i < 4; i++) {
            int h = hex(p[i]);
            if (h < 0) return fail("bad \\u escape");
            v = v << 4 | (unsigned) h;
        }
        p += 4;
        return true;
    }
    static void utf8(std::string &out, unsigned cp) {
        if (cp < 0x80) out += (char) cp;
        else if (cp < 0x800) { out += (char) (0xC0 | cp >> 6); out += (char) (0x80 | (cp & 0x3F)); }
        else if (cp < 0x10000) { out += (char) (0xE0 | cp >> 12); out += (char) (0x80 | (cp >> 6 & 0x3F)); out += (char) (0x80 | (cp & 0x3F)); }
        else { out += (char) (0xF0 | cp >> 18); out += (char) (0x80 | (cp >> 12 & 0x3F)); out += (char) (0x80 | (cp >> 6 & 0x3F)); out += (char) (0x80 | (cp & 0x3F)); }
    }

    // At '"': reads a string; decodes it into *out when given.
    bool string(std::string *out) {
        if (p >= end || *p != '"') return fail("expected string");
        ++p;
        while (true) {
            if (p >= end) return fail("unterminated string");
            unsigned char c = (unsigned char) *p;
            if (c == '"') { ++p; return true; }
            if (c < 0x20) return fail("control character in string");
            if (c != '\\') {
                const char *run = p;
                while (p < end && *p != '"' && *p != '\\' && (unsigned char) *p >= 0x20) ++p;
                if (out) out->append(run, (size_t) (p - run));
                continue;
            }
            ++p;
            if (p >= end) return fail("unterminated string");
            char e = *p++;
            char lit;
            switch (e) {
            case '"': lit = '"'; break;
            case '\\': lit = '\\'; break;
            case '/': lit = '/'; break;
            case 'b': lit = '\b'; break;
            case 'f': lit = '\f'; break;
            case 'n': lit = '\n'; break;
            case 'r': lit = '\r'; break;
            case 't': lit = '\t'; break;
            case 'u': {
                unsigned cp;
                if (!hex4(cp)) return false;
                if (cp >= 0xDC00 && cp <= 0xDFFF) return fail("lone surrogate");
                if (cp >= 0xD800 && cp <= 0xDBFF) {
                    unsigned lo;
                    if (end - p < 2 || p[0] != '\\' || p[1] != 'u') return fail("lone surrogate");
                    p += 2;
                    if (!hex4(lo)) return false;
                    if (lo < 0xDC00 || lo > 0xDFFF) return fail("lone surrogate");
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                }
                if (out) utf8(*out, cp);
                continue;
            }
            default: return fail("bad escape");
            }
            if (out) *out += lit;
        }
    }

    bool number() {
        if (p < end && *p == '-') ++p;
        if (p >= end) return fail("bad number");
        if (*p == '0') ++p;
        else if (*p >= '1' && *p <= '9') while (p < end && *p >= '0' && *p <= '9') ++p;
        else return fail("bad number");
        if (p < end && *p == '.') {
            ++p;
            if (p >= end || *p < '0' || *p > '9') return fail("bad number");
            while (p < end && *p >= '0' && *p <= '9') ++p;
        }
        if (p < end && (*p == 'e' || *p == 'E')) {
            ++p;
            if (p < end && (*p == '+' || *p == '-')) ++p;
            if (p >= end || *p < '0' || *p > '9') return fail("bad number");
            while (p < end && *p >= '0' && *p <= '9') ++p;
        }
        return true;
    }

    bool literal(const char *word) {
        size_t n = strlen(word);
        if ((size_t) (end - p) < n || memcmp(p, word, n) != 0) return fail("bad literal");
        p += n;
        return true;
    }

    // Skips one value (validating it); depth counts enclosing arrays/objects.
    bool value(int depth) {
        if (p >= end) return fail("unexpected end");
        switch (*p) {
        case '"': return string(nullptr);
        case '{': case '[': {
            if (depth + 1 > MAX_DEPTH) return fail("JSON nested too deep");
            char close = *p == '{' ? '}' : ']';
            bool obj = *p == '{';
            ++p;
            ws();
            if (p < end && *p == close) { ++p; return true; }
            while (true) {
                if (obj) {
                    if (!string(nullptr)) return false;
                    ws();
                    if (p >= end || *p != ':') return fail("expected ':'");
                    ++p;
                    ws();
                }
                if (!value(depth + 1)) return false;
                ws();
                if (p < end && *p == ',') { ++p; ws(); continue; }
                if (p < end && *p == close) { ++p; return true; }
                return fail("expected ',' or closing bracket");
            }
        }
        case 't': return literal("true");
        case 'f': return literal("false");
        case 'n': return literal("null");
        default: return number();
        }
    }
};

struct Fields {
    std::optional<std::string_view> type, topic, event, payload, message;
};

// Parses a top-level object, keeping the raw text of the members we use.
// Returns an error message, or nullptr.
const char *parseObject(std::string_view text, Fields &f) {
    Reader r{text.data(), text.data() + text.size()};
    r.ws();
    if (r.p >= r.end || *r.p != '{') return "message must be a JSON object";
    ++r.p;
    r.ws();
    if (r.p < r.end && *r.p == '}') {
        ++r.p;
    } else {
        std::string key;
        while (true) {
            key.clear();
            if (!r.string(&key)) return r.err;
            r.ws();
            if (r.p >= r.end || *r.p != ':') return "invalid JSON: expected ':'";
            ++r.p;
            r.ws();
            const char *start = r.p;
            if (!r.value(1)) return r.err;
            std::string_view raw(start, (size_t) (r.p - start));
            std::optional<std::string_view> *slot = nullptr;
            if (key == "type") slot = &f.type;
            else if (key == "topic") slot = &f.topic;
            else if (key == "event") slot = &f.event;
            else if (key == "payload") slot = &f.payload;
            else if (key == "message") slot = &f.message;
            if (slot) {
                if (slot->has_value()) return "invalid JSON: duplicate field";
                // serde treats an explicit null like an absent Option field.
                if (raw != "null") *slot = raw;
            }
            r.ws();
            if (r.p < r.end && *r.p == ',') { ++r.p; r.ws(); continue; }
            if (r.p < r.end && *r.p == '}') { ++r.p; break; }
            return "invalid JSON: expected ',' or '}'";
        }
    }
    r.ws();
    if (r.p != r.end) return "invalid JSON: trailing characters";
    return nullptr;
}

// Decodes a raw JSON string value; false if it is not a string.
bool decodeString(std::string_view raw, std::string &out) {
    out.clear();
    if (raw.empty() || raw[0] != '"') return false;
    Reader r{raw.data(), raw.data() + raw.size()};
    return r.string(&out) && r.p == r.end;
}

bool validName(const std::string &s) {
    if (s.empty() || s.size() > MAX_NAME_BYTES) return false;
    for (unsigned char c : s) if (c < 0x20 || c == 0x7F) return false;
    return true;
}

// Appends s as a JSON string literal escaped exactly as serde_json does:
// '"' and '\\' escaped, \b \t \n \f \r short forms, other control bytes as
// \u00xx (lowercase hex); '/', DEL and non-ASCII as they are.
void writeJsonStr(std::string &out, std::string_view s) {
    static const char HEX[] = "0123456789abcdef";
    out += '"';
    size_t run = 0;
    for (size_t i = 0; i < s.size(); i++) {
        unsigned char c = (unsigned char) s[i];
        const char *esc = nullptr;
        char u[7];
        switch (c) {
        case '"': esc = "\\\""; break;
        case '\\': esc = "\\\\"; break;
        case '\b': esc = "\\b"; break;
        case '\t': esc = "\\t"; break;
        case '\n': esc = "\\n"; break;
        case '\f': esc = "\\f"; break;
        case '\r': esc = "\\r"; break;
        default:
            if (c < 0x20) {
                u[0] = '\\'; u[1] = 'u'; u[2] = '0'; u[3] = '0'; u[4] = HEX[c >> 4]; u[5] = HEX[c & 15]; u[6] = 0;
                esc = u;
            }
        }
        if (esc) {
            out.append(s.data() + run, i - run);
            out += esc;
            run = i + 1;
        }
    }
    out.append(s.data() + run, s.size() - run);
    out += '"';
}

bool validUtf8(std::string_view s) {
    const unsigned char *p = (const unsigned char *) s.data(), *e = p + s.size();
    while (p < e) {
        unsigned c = *p;
        if (c < 0x80) { ++p; continue; }
        int n;
        unsigned cp;
        if ((c & 0xE0) == 0xC0) { n = 1; cp = c & 0x1F; if (cp < 2) return false; }
        else if ((c & 0xF0) == 0xE0) { n = 2; cp = c & 0x0F; }
        else if ((c & 0xF8) == 0xF0) { n = 3; cp = c & 0x07; }
        else return false;
        if (e - p <= n) return false;
        for (int i = 1; i <= n; i++) {
            if ((p[i] & 0xC0) != 0x80) return false;
            cp = cp << 6 | (p[i] & 0x3F);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 3 && (cp < 0x10000 || cp > 0x10FFFF))) return false;
        p += n + 1;
    }
    return true;
}

// {"type":"push","topic":T,"event":E,"payload":P} as ringcast's message::push builds it.
void buildPush(std::string &out, std::string_view topic, std::string_view event, std::string_view payloadJson) {
    out.clear();
    out.reserve(48 + topic.size() + event.size() + payloadJson.size());
    out += "{\"type\":\"push\",\"topic\":";
    writeJsonStr(out, topic);
    out += ",\"event\":";
    writeJsonStr(out, event);
    out += ",\"payload\":";
    out += payloadJson.empty() ? std::string_view("null") : payloadJson;
    out += '}';
}

std::string typedTopic(const char *kind, std::string_view topic) {
    std::string out = "{\"type\":\"";
    out += kind;
    out += "\",\"topic\":";
    writeJsonStr(out, topic);
    out += '}';
    return out;
}

std::string errorFrame(std::string_view message) {
    std::string out = "{\"type\":\"error\",\"message\":";
    writeJsonStr(out, message);
    out += '}';
    return out;
}

// ---------------------------------------------------------------- pub/sub

uWS::App *app = nullptr;
std::string pushScratch;

void publishPush(const std::string &frame, const std::string &topic) {
    bool compress = opts.compression && frame.size() >= opts.compressionMinBytes;
    if (opts.prepared) {
        // One deflate per publish; every subscriber that negotiated
        // permessage-deflate gets the same compressed bytes (uWS only uses
        // them when smaller than the original). Delivered at once per
        // subscriber (no per-loop-iteration batching as with publish()).
        uWS::PreparedMessage pm = uWS::Loop::get()->prepareMessage(frame, uWS::OpCode::TEXT, compress);
        app->publishPrepared(topic, pm);
    } else {
        // Queued in uWS's TopicTree and drained per subscriber at the end of
        // the loop iteration; with compression each subscriber's send deflates
        // the message again with the loop's shared compressor.
        app->publish(topic, frame, uWS::OpCode::TEXT, compress);
    }
}

struct PerSocketData {};

void onWsMessage(uWS::WebSocket<false, true, PerSocketData> *ws, std::string_view text, uWS::OpCode op) {
    if (op != uWS::OpCode::TEXT) {
        ws->send(errorFrame("binary messages are not supported"), uWS::OpCode::TEXT);
        return;
    }
    std::string_view trimmed = text;
    while (!trimmed.empty() && (trimmed.front() == ' ' || trimmed.front() == '\t' || trimmed.front() == '\n' || trimmed.front() == '\r')) trimmed.remove_prefix(1);
    while (!trimmed.empty() && (trimmed.back() == ' ' || trimmed.back() == '\t' || trimmed.back() == '\n' || trimmed.back() == '\r')) trimmed.remove_suffix(1);
    if (trimmed == "ping") {
        ws->send("pong", uWS::OpCode::TEXT);
        return;
    }
    Fields f;
    if (const char *e = parseObject(text, f)) {
        ws->send(errorFrame(e), uWS::OpCode::TEXT);
        return;
    }
    std::string kind, topic, event;
    if (!f.type) { ws->send(errorFrame("missing field `type`"), uWS::OpCode::TEXT); return; }
    if (!decodeString(*f.type, kind)) { ws->send(errorFrame("field `type` must be a string"), uWS::OpCode::TEXT); return; }
    if (kind == "ping") { ws->send("{\"type\":\"pong\"}", uWS::OpCode::TEXT); return; }
    bool sub = kind == "subscribe", unsub = kind == "unsubscribe", pub = kind == "message" || kind == "publish";
    if (!sub && !unsub && !pub) {
        ws->send(errorFrame("unknown message type `" + kind.substr(0, 64) + "`"), uWS::OpCode::TEXT);
        return;
    }
    if (!f.topic) { ws->send(errorFrame("missing field `topic`"), uWS::OpCode::TEXT); return; }
    if (!decodeString(*f.topic, topic) || !validName(topic)) {
        ws->send(errorFrame("topic must be a non-empty string of at most 256 bytes"), uWS::OpCode::TEXT);
        return;
    }
    if (sub) {
        ws->subscribe(topic);
        ws->send(typedTopic("subscribed", topic), uWS::OpCode::TEXT);
    } else if (unsub) {
        ws->unsubscribe(topic);
        ws->send(typedTopic("unsubscribed", topic), uWS::OpCode::TEXT);
    } else {
        if (f.event) {
            if (!decodeString(*f.event, event)) {
                ws->send(errorFrame("field `event` must be a string"), uWS::OpCode::TEXT);
                return;
            }
            if (!validName(event)) {
                ws->send(errorFrame("field `event` must be a non-empty string of at most 256 bytes"), uWS::OpCode::TEXT);
                return;
            }
        } else {
            event = "message";
        }
        buildPush(pushScratch, topic, event, f.payload ? *f.payload : std::string_view("null"));
        publishPush(pushScratch, topic);
    }
}

// ---------------------------------------------------------------- HTTP

void reply(uWS::HttpResponse<false> *res, const char *status, std::string_view body) {
    res->cork([res, status, body]() {
        res->writeStatus(status)->writeHeader("Content-Type", "application/json")->end(body);
    });
}

void replyError(uWS::HttpResponse<false> *res, const char *status, std::string_view message) {
    std::string body = "{\"error\":";
    writeJsonStr(body, message);
    body += '}';
    reply(res, status, body);
}

// Handles a complete POST /publish body.
void publishBody(uWS::HttpResponse<false> *res, std::string_view body) {
    if (!validUtf8(body)) { replyError(res, "400 Bad Request", "invalid JSON: body is not valid UTF-8"); return; }
    Fields f;
    if (const char *e = parseObject(body, f)) { replyError(res, "400 Bad Request", e); return; }
    std::string topic, event, msg;
    if (!f.topic) { replyError(res, "400 Bad Request", "missing field `topic`"); return; }
    if (!decodeString(*f.topic, topic) || !validName(topic)) {
        replyError(res, "400 Bad Request", "topic must be a non-empty string of at most 256 bytes");
        return;
    }
    if (f.event) {
        if (!decodeString(*f.event, event)) {
            replyError(res, "400 Bad Request", "field `event` must be a string");
            return;
        }
        if (!validName(event)) {
            replyError(res, "400 Bad Request", "field `event` must be a non-empty string of at most 256 bytes");
            return;
        }
    } else {
        event = "message";
    }
    if (f.message && !decodeString(*f.message, msg)) {
        replyError(res, "400 Bad Request", "field `message` must be a string");
        return;
    }
    // As ringcast: payload, else the raw text of a string `message`, else null.
    std::string_view payload = f.payload ? *f.payload : f.message ? *f.message : std::string_view("null");
    buildPush(pushScratch, topic, event, payload);
    publishPush(pushScratch, topic);
    reply(res, "202 Accepted", "{\"status\":\"accepted\"}");
}

int parseArgs(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        std::string_view a = argv[i];
        if (a == "--compression") opts.compression = true;
        else if (a == "--prepared") { opts.prepared = true; opts.compression = true; }
        else if (a == "--compression-min-bytes" && i + 1 < argc) opts.compressionMinBytes = strtoul(argv[++i], nullptr, 10);
        else if (a == "-h" || a == "--help") return -1;
        else if (!opts.port && !a.empty() && a[0] != '-') opts.port = atoi(argv[i]);
        else { fprintf(stderr, "unknown argument: %s\n", argv[i]); return -1; }
    }
    return opts.port > 0 && opts.port < 65536 ? 0 : -1;
}

} // namespace

int main(int argc, char **argv) {
    if (parseArgs(argc, argv) != 0) {
        fprintf(stderr, "usage: %s PORT [--compression] [--compression-min-bytes N] [--prepared]\n", argv[0]);
        return 2;
    }

    uWS::App a;
    app = &a;

    uWS::App::WebSocketBehavior<PerSocketData> behavior = {};
    behavior.compression = opts.compression ? uWS::SHARED_COMPRESSOR : uWS::DISABLED;
    behavior.maxPayloadLength = 64 * 1024;
    behavior.idleTimeout = 120;
    behavior.maxBackpressure = 1024 * 1024;
    behavior.closeOnBackpressureLimit = false;
    behavior.message = onWsMessage;

    a.ws<PerSocketData>("/ws", std::move(behavior))
    .get("/health", [](auto *res, auto * /*req*/) {
        reply(res, "200 OK", "{\"status\":\"ok\"}");
    })
    .post("/publish", [](auto *res, auto * /*req*/) {
        auto aborted = std::make_shared<bool>(false);
        res->onAborted([aborted]() { *aborted = true; });
        std::unique_ptr<std::string> buffer;
        res->onData([res, aborted, buffer = std::move(buffer), tooLarge = false](std::string_view chunk, bool fin) mutable {
            if (*aborted) return;
            if (!tooLarge && (buffer ? buffer->size() : 0) + chunk.size() > MAX_BODY_BYTES) {
                tooLarge = true;
                buffer.reset();
            }
            if (!fin) {
                if (!tooLarge) {
                    if (!buffer) buffer = std::make_unique<std::string>(chunk);
                    else buffer->append(chunk);
                }
                return;
            }
            if (tooLarge) { replyError(res, "413 Content Too Large", "body too large"); return; }
            if (buffer) {
                buffer->append(chunk);
                publishBody(res, *buffer);
            } else {
                publishBody(res, chunk);  // whole body in one chunk: no copy
            }
        });
    })
    .any("/*", [](auto *res, auto * /*req*/) {
        replyError(res, "404 Not Found", "not found");
    })
    .listen("127.0.0.1", opts.port, [](auto *listenSocket) {
        if (listenSocket) {
            fprintf(stderr, "uws-peer listening on 127.0.0.1:%d (compression %s%s, min bytes %zu)\n", opts.port,
                    opts.compression ? "shared" : "off", opts.prepared ? ", prepared" : "", opts.compressionMinBytes);
        } else {
            fprintf(stderr, "uws-peer: cannot listen on 127.0.0.1:%d\n", opts.port);
            exit(1);
        }
    })
    .run();
    return 0;
}
