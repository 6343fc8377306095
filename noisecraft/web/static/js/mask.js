// The editing stage: the source image on one canvas and the inpainting mask painted on a
// second canvas laid over it (same pixel size).  White paint = repaint, nothing = keep.

export class MaskStage {
  constructor(imageCanvas, maskCanvas) {
    this.image = imageCanvas;
    this.mask = maskCanvas;
    this.brush = 32;
    this.eraser = false;
    this.source = null; // the loaded image (ImageBitmap), kept for outpaint previews
    this.outpaint = [0, 0, 0, 0];
    let last = null;
    const paint = (ev) => {
      if (!this.source || !(ev.buttons & 1)) { last = null; return; }
      const p = this.toPixels(ev);
      const ctx = this.mask.getContext("2d");
      ctx.globalCompositeOperation = this.eraser ? "destination-out" : "source-over";
      ctx.strokeStyle = ctx.fillStyle = "#fff";
      ctx.lineWidth = this.brush;
      ctx.lineCap = "round";
      ctx.beginPath();
      ctx.moveTo(...(last ?? p));
      ctx.lineTo(...p);
      ctx.stroke();
      last = p;
      ev.preventDefault();
    };
    maskCanvas.addEventListener("pointerdown", (ev) => {
      maskCanvas.setPointerCapture?.(ev.pointerId);
      last = null;
      paint(ev);
    });
    maskCanvas.addEventListener("pointermove", paint);
    maskCanvas.addEventListener("pointerup", () => { last = null; });
  }

  toPixels(ev) {
    const r = this.mask.getBoundingClientRect();
    return [(ev.clientX - r.left) * this.mask.width / r.width,
      (ev.clientY - r.top) * this.mask.height / r.height];
  }

  get loaded() { return this.source !== null; }

  async load(blob) {
    this.source = await createImageBitmap(blob);
    this.draw();
    this.clear();
  }

  // The image, drawn inside the outpaint border (grey) when outpainting.
  draw() {
    if (!this.source) return;
    const [l, t, r, b] = this.outpaint;
    const w = this.source.width + l + r;
    const h = this.source.height + t + b;
    for (const c of [this.image, this.mask]) {
      if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    }
    const ctx = this.image.getContext("2d");
    ctx.fillStyle = "#555";
    ctx.fillRect(0, 0, w, h);
    ctx.drawImage(this.source, l, t);
  }

  setOutpaint(sides) {
    this.outpaint = sides;
    this.draw();
    this.clear();
  }

  clear() { this.mask.getContext("2d").clearRect(0, 0, this.mask.width, this.mask.height); }

  invert() {
    const ctx = this.mask.getContext("2d");
    const data = ctx.getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 0; i < data.data.length; i += 4) {
      const on = data.data[i + 3] > 127;
      data.data.set(on ? [0, 0, 0, 0] : [255, 255, 255, 255], i);
    }
    ctx.putImageData(data, 0, 0);
  }

  painted() {
    const d = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height);
    for (let i = 3; i < d.data.length; i += 4) if (d.data[i] > 127) return true;
    return false;
  }

  // The source image alone (no outpaint border) as a PNG blob.
  sourcePNG() {
    const c = document.createElement("canvas");
    c.width = this.source.width;
    c.height = this.source.height;
    c.getContext("2d").drawImage(this.source, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }

  // The mask as the server wants it: white = repaint, black = keep, opaque PNG.
  maskPNG() {
    const c = document.createElement("canvas");
    c.width = this.mask.width;
    c.height = this.mask.height;
    const ctx = c.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, c.width, c.height);
    ctx.drawImage(this.mask, 0, 0);
    return new Promise((resolve) => c.toBlob(resolve, "image/png"));
  }
}
