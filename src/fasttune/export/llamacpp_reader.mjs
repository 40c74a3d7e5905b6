// Reads one GGUF file with llama.cpp (the prebuilt CPU library of the npm package node-llama-cpp) and
// answers the requests fasttune's export check and tests send: metadata, tokenize, greedy generation,
// next-token log-probabilities (perplexity), and the chat template as llama.cpp's wrapper renders it.
//
// Usage: node llamacpp_reader.mjs REQUEST.json  (NODE_LLAMA_CPP_ENTRY: node-llama-cpp's dist/index.js)
// REQUEST: {"threads": N, "context": N, "jobs": [{"model": PATH, "requests": [{"op": ...}, ...]}, ...]}
// Prints one JSON object: {"llama_cpp": {...versions}, "jobs": [[result, ...], ...]}, one result per
// request of each job. One process answers several files, so llama.cpp starts once.
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const request = JSON.parse(readFileSync(process.argv[2], "utf8"));
const nlc = await import(pathToFileURL(process.env.NODE_LLAMA_CPP_ENTRY).href);
const llama = await nlc.getLlama({
  gpu: false,
  build: "never",
  skipDownload: true,
  logLevel: "error",
  maxThreads: request.threads ?? 2,
});
let model, context, sequence;
// Greedy decoding: llama.cpp's argmax of each step's logits until a stop id or max_tokens.
async function generate({ tokens, max_tokens, stop_ids }) {
  await sequence.clearHistory();
  const out = [];
  const stops = new Set(stop_ids ?? []);
  for await (const token of sequence.evaluate(tokens, { temperature: 0, yieldEogToken: true })) {
    out.push(token);
    if (stops.has(token) || out.length >= max_tokens) break;
  }
  return { tokens: out };
}

// log p(token[i+1] | token[..i]) for every position from the next-token distribution at temperature 1;
// with full, also every token's log-probability at every position (small vocabularies: tests).
async function logprobs({ tokens, full }) {
  await sequence.clearHistory();
  const all = { temperature: 1, topK: 0, topP: 1, minP: 0 };
  const input = tokens.map((t, i) =>
    i < tokens.length - 1 ? [t, { generateNext: { probabilities: true, options: all } }] : t,
  );
  const results = await sequence.controlledEvaluate(input);
  const out = [];
  const vectors = [];
  for (let i = 0; i < tokens.length - 1; i++) {
    const probs = results[i]?.next?.probabilities;
    out.push(Math.log(probs?.get(tokens[i + 1]) ?? 0));
    if (full) {
      const v = new Array(model.tokens.vocabularySize ?? 0).fill(null);
      for (const [t, p] of probs ?? []) v[t] = Math.log(p);
      vectors.push(v);
    }
  }
  return full ? { logprobs: out, vectors } : { logprobs: out };
}

function chatTemplate({ messages }) {
  const template = model.fileInfo.metadata?.tokenizer?.chat_template;
  if (!template) return { text: null };
  const wrapper = new nlc.JinjaTemplateChatWrapper({ template, tokenizer: model.tokenizer });
  const history = messages.map((m) =>
    m.role === "system"
      ? { type: "system", text: m.content }
      : m.role === "user"
        ? { type: "user", text: m.content }
        : { type: "model", response: [m.content] },
  );
  history.push({ type: "model", response: [] });
  const { contextText } = wrapper.generateContextState({ chatHistory: history });
  return { text: contextText.toString(), tokens: contextText.tokenize(model.tokenizer) };
}

function meta() {
  const t = model.tokens;
  return {
    architecture: model.fileInfo.metadata?.general?.architecture,
    file_type: model.fileInfo.metadata?.general?.file_type,
    bos: t.bos,
    eos: t.eos,
    eot: t.eot,
    add_bos: t.shouldPrependBosToken,
    vocab_size: model.vocabularySize ?? null,
    chat_template: model.fileInfo.metadata?.tokenizer?.chat_template ?? null,
  };
}

const ops = {
  meta,
  tokenize: ({ text, special }) => ({ tokens: Array.from(model.tokenize(text, !!special)) }),
  detokenize: ({ tokens, special }) => ({ text: model.detokenize(tokens, !!special) }),
  generate,
  logprobs,
  chat_template: chatTemplate,
};
const jobs = [];
for (const job of request.jobs) {
  model = await llama.loadModel({ modelPath: job.model, gpuLayers: 0 });
  context = await model.createContext({
    contextSize: request.context ?? 512,
    batchSize: request.context ?? 512,
    sequences: 1,
    threads: request.threads ?? 2,
  });
  sequence = context.getSequence();
  const results = [];
  for (const r of job.requests) {
    if (!(r.op in ops)) throw new Error(`unknown op ${r.op}`);
    results.push(await ops[r.op](r));
  }
  jobs.push(results);
  await context.dispose();
  await model.dispose();
}
const pkgUrl = new URL("../package.json", pathToFileURL(process.env.NODE_LLAMA_CPP_ENTRY));
const pkg = JSON.parse(readFileSync(pkgUrl, "utf8"));
console.log(
  JSON.stringify({
    llama_cpp: { node_llama_cpp: pkg.version, release: llama.llamaCppRelease ?? null },
    jobs,
  }),
);
await llama.dispose();
